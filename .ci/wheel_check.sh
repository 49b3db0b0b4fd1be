#!/usr/bin/env bash
# Build a wheel from the repo (no setuptools warnings allowed), install it into a fresh venv (base
# deps only) and check that the lean runtime works without torch and that every command starts.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf build  # stale build/lib files would leak into the wheel
repo=$(pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# (byte-compiling off in this environment is not a packaging warning)
env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -m build --wheel --outdir "$tmp/dist" . >"$tmp/build.log" 2>&1 || {
  cat "$tmp/build.log"; exit 1; }
if grep -iE "warning|deprecat" "$tmp/build.log"; then
  echo "wheel build printed warnings (above)"; exit 1
fi
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q "$tmp"/dist/spade_edge-*.whl
cd "$tmp"
"$tmp/venv/bin/python" - <<'PY'
import sys
import spade_edge.runtime, spade_edge.runtime.detector, spade_edge.runtime.gallery
import spade_edge.cli.app, spade_edge.calibration
assert "torch" not in sys.modules, "the runtime imported torch"
import importlib.util
# tools/spade_edge_testing (emulator, GPU fakes) is for tests only, never in the wheel
assert importlib.util.find_spec("spade_edge_testing") is None, "the wheel ships spade_edge_testing"
from importlib.resources import files
kernels = [p.name for p in (files("spade_edge.runtime") / "matchers" / "kernels").iterdir()]
assert any(k.endswith(".cu") for k in kernels), kernels
print("wheel ok:", spade_edge.runtime.__file__, "kernels:", sorted(kernels))
PY
for s in spade spade-run spade-pack spade-threshold spade-inspect spade-eval spade-bench spade-export spade-demo spade-serve spade-triton; do
  "$tmp/venv/bin/$s" --help >/dev/null
done
"$tmp/venv/bin/python" "$repo/.ci/wheel_usage.py" "$tmp/venv/bin"
echo "wheel check passed"
