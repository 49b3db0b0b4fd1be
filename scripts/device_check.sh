#!/usr/bin/env bash
# `make device-check`: everything that needs an NVIDIA GPU, in one offline run (< 8 minutes).
#
# Expects the machine described in docs/cuda.md: python3 (3.12) with numpy/scipy/onnxruntime/
# Pillow/typer/rich/scikit-learn/torch/CuPy, nvcc, no network, no pycuda, no TensorRT; and the
# folder .device/ made by scripts/prepare_device.sh (carried along). Steps:
#   build  pycuda from .device/sdist (parallel compile, -O1), its deps from .device/wheels
#   tests  tests/test_cuda_matcher.py (GPU + real bottle data) and tests/test_kernels_compile.py
#   bench  spade bench --matcher cuda (wrn50 at K=5/50, Lite0)
#   eval   spade-eval Lite0 on bottle with --matcher numpy and cuda; metrics must agree +-0.002
#   sanitize  compute-sanitizer memcheck/racecheck/synccheck over scripts/cuda_sanitize_case.py
#          (every fused-kernel variant, odd sizes, checked against NumPy); last, uses what is left
# Logs and JSON go to $OUT (or ./device_out). DEVICE_CHECK_BUDGET_S (default 450) caps the
# whole run: each step's timeout is cut to what is left, later steps are skipped when none is.
# DEVICE_CHECK_STEPS (default "build tests bench eval sanitize") picks steps. Exit status: 0
# when every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
D=${SPADE_DEVICE_DIR:-$ROOT/.device}
OUT=${OUT:-$ROOT/device_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STEPS=${DEVICE_CHECK_STEPS:-build tests bench eval sanitize}
BUDGET=${DEVICE_CHECK_BUDGET_S:-450}
export PYTHONUNBUFFERED=1
export PATH="$PATH:/usr/local/cuda/bin"
export SPADE_CUDA_CACHE=${SPADE_CUDA_CACHE:-/tmp/spade_cuda_cache}
T0=$(date +%s)
SUMMARY=()
FAILED=0

elapsed() { echo $(($(date +%s) - T0)); }
left() { echo $((BUDGET - $(elapsed))); }
say() { echo "== [$(elapsed)s] $*"; }
note() { SUMMARY+=("$1|$2|$3"); [ "$2" = FAIL ] && FAILED=1; }
has_step() { [[ " $STEPS " == *" $1 "* ]]; }
# run_for MAX_SECONDS cmd...: timeout = min(MAX, time left), refuse to start below 15 s
run_for() {
    local max=$1
    shift
    local t
    t=$(left)
    [ "$t" -gt "$max" ] && t=$max
    if [ "$t" -lt 15 ]; then
        echo "skipped (budget of ${BUDGET}s used up)"
        return 124
    fi
    timeout --kill-after=5 "$t" "$@"
}

main() {
say "device check: $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no nvidia-smi')"
echo "python: $($PY -V 2>&1), nvcc: $(nvcc --version 2>/dev/null | tail -1)"

# ------------------------------------------------------------------ spade_edge on the path
# The package maps export/, runtime/, calibration/ to spade_edge.*; a symlink farm does the
# same without pip (no network, no build isolation, nothing written into the repo). tools/ holds
# spade_edge_testing, which the tests and scripts import (pip install -e tools elsewhere).
PKG=/tmp/spade_pkg
mkdir -p "$PKG/spade_edge"
for sub in export runtime calibration; do ln -sfn "$ROOT/$sub" "$PKG/spade_edge/$sub"; done
export PYTHONPATH="$PKG:$ROOT/tools${PYTHONPATH:+:$PYTHONPATH}"
# Real data where the tests look for it (../shared/data), from the carried copy.
if [ -d "$D/data/mvtec_ad/bottle" ] && [ ! -d "$ROOT/../shared/data/mvtec_ad/bottle" ]; then
    mkdir -p "$ROOT/../shared/data/mvtec_ad"
    ln -sfn "$D/data/mvtec_ad/bottle" "$ROOT/../shared/data/mvtec_ad/bottle"
fi

# ------------------------------------------------------------------ build pycuda
build_pycuda() {
    local site=/tmp/spade_site build=/tmp/spade_pycuda
    if ls "$D"/wheels/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
            "$D"/wheels/*.whl || return 1
        export PYTHONPATH="$PYTHONPATH:$site"
    fi
    if $PY -c "import pycuda.driver" 2>/dev/null; then
        echo "pycuda already importable"
        return 0
    fi
    local sdist
    sdist=$(ls "$D"/sdist/pycuda-*.tar.gz 2>/dev/null | head -1)
    [ -n "$sdist" ] || { echo "no pycuda sdist in $D/sdist (run scripts/prepare_device.sh)"; return 1; }
    rm -rf "$build" && mkdir -p "$build" && tar xzf "$sdist" -C "$build" || return 1
    local src
    src=$(ls -d "$build"/pycuda-*/ | head -1)
    # CUDA root: the toolkit holding cuda.h, next to nvcc
    local cuda_root="" r
    for r in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda \
        "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
        if [ -n "$r" ] && [ -f "$r/include/cuda.h" ]; then cuda_root=$r; break; fi
    done
    [ -n "$cuda_root" ] || { echo "cuda.h not found"; return 1; }
    # libcuda.so to link against: a toolkit stub, the driver's own, or a link to libcuda.so.1
    local libdir="${SPADE_LIBCUDA_DIR:-}" d so
    if [ -z "$libdir" ]; then
        for d in "$cuda_root/lib64/stubs" "$cuda_root/lib/stubs" \
            "$cuda_root/targets/x86_64-linux/lib/stubs" /usr/local/nvidia/lib64 \
            /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
            if [ -e "$d/libcuda.so" ]; then libdir=$d; break; fi
        done
    fi
    if [ -z "$libdir" ]; then
        so=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')
        [ -n "$so" ] || so=$(find / -name 'libcuda.so.1' -not -path '/proc/*' 2>/dev/null | head -1)
        [ -n "$so" ] || { echo "libcuda.so.1 not found"; return 1; }
        mkdir -p /tmp/spade_libcuda && ln -sfn "$so" /tmp/spade_libcuda/libcuda.so
        libdir=/tmp/spade_libcuda
    fi
    echo "pycuda: $(basename "$sdist"), CUDA root $cuda_root, libcuda from $libdir"
    (
        cd "$src" || exit 1
        $PY configure.py --cuda-root="$cuda_root" --no-cuda-enable-curand \
            --cudadrv-lib-dir="$libdir" --cxxflags=-O1,-g0 >/dev/null || exit 1
        # setuptools compiles one file at a time; compile in parallel (the wrapper module alone
        # takes most of the time, -O1 halves it; pycuda's speed lives in the GPU code).
        $PY - <<'EOF'
import os, runpy, sys
from concurrent.futures import ThreadPoolExecutor
import setuptools  # noqa: F401  (installs the distutils shim)
from distutils import ccompiler

def compile_parallel(self, sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                     extra_preargs=None, extra_postargs=None, depends=None):
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)
    def one(obj):
        src, ext = build[obj]
        self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)
    with ThreadPoolExecutor(os.cpu_count() or 4) as ex:
        list(ex.map(one, [o for o in objects if o in build]))
    return objects

ccompiler.CCompiler.compile = compile_parallel
sys.argv = ["setup.py", "-q", "build_ext", "--inplace"]
runpy.run_path("setup.py", run_name="__main__")
EOF
    ) >"$OUT/pycuda_build.log" 2>&1 || { tail -30 "$OUT/pycuda_build.log"; return 1; }
    export PYTHONPATH="$PYTHONPATH:${src%/}"
    $PY -c "import pycuda.driver as d; d.init(); print('pycuda', __import__('pycuda').VERSION_TEXT, 'CUDA', d.get_version(), 'driver', d.get_driver_version(), d.Device(0).name())"
}

if has_step build; then
    say "build pycuda"
    t=$(elapsed)
    if build_pycuda; then note build OK "$(($(elapsed) - t))s"; else note build FAIL "see pycuda_build.log"; fi
else
    $PY -c "import pycuda.driver" 2>/dev/null || echo "warning: pycuda not importable"
fi

# ------------------------------------------------------------------ GPU tests
if has_step tests; then
    say "GPU tests"
    run_for 240 $PY -m pytest -q -rA --durations=8 -p no:cacheprovider -m "not fuzz and not simt" \
        tests/test_cuda_matcher.py tests/test_kernels_compile.py 2>&1 | tee "$OUT/pytest.log"
    rc=${PIPESTATUS[0]}
    line=$(grep -E "^(=+ )?[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s" "$OUT/pytest.log" | tail -1)
    if [ "$rc" = 0 ]; then note tests OK "$line"; else note tests FAIL "rc=$rc $line"; fi
fi

# ------------------------------------------------------------------ benchmark
if has_step bench; then
    say "benchmark (wrn50 K=5/50 with the block-rows sweep, Lite0)"
    run_for 150 $PY -m spade_edge.cli.bench --matcher cuda --backbone wrn50 --k 5 --k 50 \
        --n-gallery 1000 --repeats 20 --sweep --json "$OUT/bench_wrn50.json"
    rc=$?
    run_for 60 $PY -m spade_edge.cli.bench --matcher cuda --backbone lite0 --k 5 --k 50 \
        --n-gallery 1000 --repeats 20 --no-gemm --json "$OUT/bench_lite0.json"
    rc2=$?
    detail=$($PY - "$OUT/bench_wrn50.json" <<'EOF' 2>/dev/null
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r["k"] == 50 and r["block_rows"] == "auto"]
r = rows[0]
print(f"wrn50 K=50: layer1 fused {r['fused_layer1_tflops']} TFLOP/s vs GEMM "
      f"{r.get('gemm_layer1_tflops')} ({r.get('fused_vs_gemm_layer1')}); "
      f"matching {r['matching_ms']:.3f} ms")
EOF
)
    if [ "$rc" = 0 ] && [ "$rc2" = 0 ]; then note bench OK "$detail"; else note bench FAIL "rc=$rc/$rc2 $detail"; fi
fi

# ------------------------------------------------------------------ CPU vs CUDA spade-eval
if has_step eval; then
    say "spade-eval Lite0 on bottle: numpy vs cuda matcher"
    model=$D/lite0.onnx
    data=$D/data/mvtec_ad/bottle
    if [ ! -f "$ROOT/cli/eval.py" ]; then
        note eval SKIP "cli/eval.py not present"
    elif [ ! -f "$model" ] || [ ! -d "$data" ]; then
        note eval SKIP "no $model or $data (run scripts/prepare_device.sh)"
    else
        ok=1
        for m in numpy cuda; do
            run_for 150 $PY -c 'import sys; from spade_edge.cli.eval import main; sys.argv[0] = "spade-eval"; main()' \
                "$model" "$data" --matcher "$m" --k 5 --far 0 --json "$OUT/eval_$m.json" || ok=0
        done
        if [ "$ok" = 1 ]; then
            detail=$($PY - "$OUT/eval_numpy.json" "$OUT/eval_cuda.json" <<'EOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
bad = []
parts = []
for k in ("image_auroc", "pixel_auroc", "aupro"):
    d = abs(a[k] - b[k])
    parts.append(f"{k} {a[k]:.4f}/{b[k]:.4f}")
    if d > 0.002:
        bad.append(k)
print(("MISMATCH " + ",".join(bad) + ": " if bad else "") + "; ".join(parts))
sys.exit(1 if bad else 0)
EOF
)
            if [ $? = 0 ]; then note eval OK "$detail"; else note eval FAIL "$detail"; fi
        else
            note eval FAIL "spade-eval did not finish"
        fi
    fi
fi

# ------------------------------------------------------------------ compute-sanitizer
if has_step sanitize; then
    say "compute-sanitizer over the matcher's kernels"
    san=$(command -v compute-sanitizer || true)
    if [ -z "$san" ]; then
        note sanitize SKIP "compute-sanitizer not found"
    else
        res=""
        bad=0
        for tool in memcheck racecheck synccheck; do
            run_for 90 "$san" --tool "$tool" --error-exitcode 3 --print-limit 20 \
                $PY scripts/cuda_sanitize_case.py >"$OUT/sanitize_$tool.log" 2>&1
            rc=$?
            tail -4 "$OUT/sanitize_$tool.log"
            res="$res $tool=$([ $rc = 0 ] && echo clean || echo "rc$rc")"
            [ $rc = 0 ] || bad=1
        done
        if [ $bad = 0 ]; then note sanitize OK "$res"; else note sanitize FAIL "$res (see sanitize_*.log)"; fi
    fi
fi

say "summary"
printf '%-8s %-5s %s\n' step result detail
for row in "${SUMMARY[@]}"; do
    IFS='|' read -r a b c <<<"$row"
    printf '%-8s %-5s %s\n' "$a" "$b" "$c"
done
return $FAILED
}

main "$@" 2>&1 | tee -a "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
