#!/usr/bin/env bash
# Build a wheel from the repo, install it into a fresh venv (base deps only) and check that the
# lean runtime works without torch and that every console script starts.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf build  # stale build/lib files would leak into the wheel
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m build --wheel --outdir "$tmp/dist" . >/dev/null
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q "$tmp"/dist/spade_edge-*.whl
cd "$tmp"
"$tmp/venv/bin/python" - <<'PY'
import sys
import spade_edge.runtime, spade_edge.runtime.detector, spade_edge.runtime.gallery
import spade_edge.runtime.cli.run, spade_edge.calibration
assert "torch" not in sys.modules, "the runtime imported torch"
from importlib.resources import files
kernels = [p.name for p in (files("spade_edge.runtime") / "matchers" / "kernels").iterdir()]
assert any(k.endswith(".cu") for k in kernels), kernels
print("wheel ok:", spade_edge.runtime.__file__, "kernels:", sorted(kernels))
PY
for s in spade-run spade-pack spade-inspect spade-eval spade-bench spade-export; do
  "$tmp/venv/bin/$s" --help >/dev/null
done
echo "wheel check passed"
