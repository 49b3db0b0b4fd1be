"""Usage errors from the installed wheel's console scripts (issue 11, defect 1).

Run by .ci/wheel_check.sh with the wheel venv's python: every command answers a usage error with
typer's usage message and exit 2, never a traceback (the wheel venv has no `click`; typer
vendors its own, and spade-edge must not import it).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.argv[1])
SCRIPTS = [
    "spade",
    "spade-export",
    "spade-pack",
    "spade-threshold",
    "spade-run",
    "spade-eval",
    "spade-bench",
    "spade-inspect",
    "spade-demo",
    "spade-triton",
    "spade-serve",
]
CASES = [[s, "--no-such-option"] for s in SCRIPTS] + [
    ["spade-pack"],
    ["spade-run"],
    ["spade-run", "M", "G", "img.png", "--k", "abc"],
    ["spade-run", "M", "G", "img.png", "--threshold", "nan"],
    ["spade-pack", "M", "dir", "-o", "x.bin", "--batch-size", "0"],
    ["spade-pack", "M", "dir", "-o", "x.bin", "--far", "-1"],
    ["spade-threshold", "G", "--k", "0"],
    ["spade-eval", "M", "D", "--far", "inf"],
    ["spade-bench", "--repeats", "0"],
    ["spade", "no-such-command"],
    ["spade", "run", "M", "G", "img.png", "--pixel-threshold", "nan"],
]

print("click importable in the wheel venv:", importlib.util.find_spec("click") is not None)
bad = []
with tempfile.TemporaryDirectory() as cwd:
    for args in CASES:
        p = subprocess.run(
            [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd, timeout=120
        )
        if p.returncode != 2 or "Traceback" in p.stderr or "Usage:" not in p.stderr:
            bad.append(f"{' '.join(args)}: exit {p.returncode}\n{p.stderr[-800:]}")
for b in bad:
    print("FAIL", b)
print(f"usage errors: {len(CASES) - len(bad)}/{len(CASES)} exit 2 with typer's usage message")
sys.exit(1 if bad else 0)
