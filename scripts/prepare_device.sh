#!/usr/bin/env bash
# Fill the git-ignored .device/ folder with what scripts/device_check.sh needs on an offline GPU
# machine (Python 3.12, nvcc, torch/CuPy, numpy/scipy/onnxruntime... but no pycuda):
#   .device/sdist/   pycuda source (built there; pycuda ships no wheels)
#   .device/wheels/  pycuda's small dependencies missing there (pytools, platformdirs, mako,
#                    siphash24 for cp312)
#   .device/lite0.onnx            the exported Lite0 model (from artifacts/)
#   .device/data/mvtec_ad/bottle  the real bottle data (from ../shared/data)
# Carry it with the run: carry=[".device"] (stays < 60 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
D=.device
PYCUDA=${PYCUDA_VERSION:-2026.1}
mkdir -p "$D/sdist" "$D/wheels" "$D/data/mvtec_ad"

if ! ls "$D"/sdist/pycuda-"$PYCUDA".tar.gz >/dev/null 2>&1; then
    # --no-build-isolation: reading the sdist's metadata needs setuptools/numpy, taken from here
    "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
        "pycuda==$PYCUDA" -d "$D/sdist"
fi
"$PY" -m pip download -q --no-deps --only-binary :all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$D/wheels" \
    "pytools==2026.1.1" "platformdirs==4.14.8" "mako==1.4.3" "siphash24==1.9"

if [ ! -f artifacts/lite0.onnx ]; then  # git-ignored: export it (weights ship on PyPI)
    mkdir -p artifacts
    "$(dirname "$PY")/spade-export" --backbone efficientnet_lite0 -o artifacts/lite0.onnx
fi
cp -p artifacts/lite0.onnx "$D/lite0.onnx"
SRC=../shared/data/mvtec_ad/bottle
if [ -d "$SRC" ]; then
    rm -rf "$D/data/mvtec_ad/bottle"
    cp -a "$SRC" "$D/data/mvtec_ad/bottle"
else
    echo "note: $SRC not found; the real-data checks will skip" >&2
fi
du -sh "$D"
size=$(du -sm "$D" | cut -f1)
if [ "$size" -ge 60 ]; then
    echo "error: $D is ${size} MiB; the device carry must stay under 60 MiB" >&2
    exit 1
fi
