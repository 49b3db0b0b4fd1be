"""Run mypy over spade_edge as it installs, and the test scaffolding spade_edge_testing
(``make lint`` and .ci/run call this).

Why a link tree: pyproject's ``package-dir`` maps top-level folders to subpackages
(runtime/ -> spade_edge.runtime, tritonrepo/ -> spade_edge.triton, ...). mypy reads neither that
mapping nor setuptools' editable-install finder, so build/typecheck/spade_edge/<name> is made a
symlink to each mapped folder (and build/typecheck/spade_edge_testing to tools/'s package) and
mypy checks ``-p spade_edge -p spade_edge_testing`` there, with the settings of pyproject's
[tool.mypy]. Extra arguments go to mypy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"
TESTING = "spade_edge_testing"  # tools/spade_edge_testing: test scaffolding, not in the wheel


def link_tree() -> Path:
    """(Re)build build/typecheck/spade_edge from pyproject's package-dir (and link
    spade_edge_testing); returns their parent."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping: dict[str, str] = cfg["tool"]["setuptools"]["package-dir"]
    pkg = TREE / "spade_edge"
    if pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for name, folder in mapping.items():
        prefix, _, sub = name.partition(".")
        if prefix != "spade_edge" or not sub or "." in sub:
            raise SystemExit(f"typecheck: unexpected package-dir entry {name!r}")
        os.symlink(ROOT / folder, pkg / sub, target_is_directory=True)
    testing = TREE / TESTING
    if testing.is_symlink() or testing.exists():
        testing.unlink()
    os.symlink(ROOT / "tools" / TESTING, testing, target_is_directory=True)
    return TREE


def main(argv: list[str]) -> int:
    tree = link_tree()
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    return subprocess.call([*cmd, *argv, "-p", "spade_edge", "-p", TESTING], cwd=tree)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
