"""Every TensorRT name spade-edge touches exists, with a matching call signature, in the REAL
Python bindings of TensorRT 10.3 (JetPack 6), 10.16, 11.0 and 11.4.

How (no TensorRT libraries, no GPU here): spade_edge_testing.trt_snapshot imports the real
pybind11 module of each ``tensorrt-cu1x-bindings`` wheel against stub libnvinfer/libnvonnxparser/
libnvinfer_plugin libraries that export the nine C entry points it links, and records every
class, member, enum value and signature. The committed snapshots (its trt_snapshots/trt-*.json)
are checked here against ``TRT_API`` (runtime/runners/trt.py); an AST scan checks that the code
uses no TensorRT member name missing from ``TRT_API`` and that ``TRT_API`` has no stale entry.
``test_snapshots_are_reproducible`` regenerates the snapshots from the wheels (pip download,
cached in build/trt_api/) and skips when that is impossible (offline, no C compiler).

Limits (honest): names, enum values and arities are checked; behaviour is not. No TensorRT
call has executed here: creating a Builder against the stubs returns NULL.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from spade_edge.runtime.runners.trt import TRT_API, TRT_FEATURES, features_for
from spade_edge_testing import trt_snapshot as snapmod
from spade_edge_testing.trt_snapshot import SNAP_DIR

REPO = Path(__file__).resolve().parent.parent
CODE_FILES = (REPO / "export" / "trt_build.py", REPO / "runtime" / "runners" / "trt.py")
SNAPSHOTS = sorted(SNAP_DIR.glob("trt-*.json"))

#: Attribute names the code uses on NON-TensorRT objects that happen to equal some TensorRT
#: member name (the AST scan cannot tell objects apart). Each one says where it is used.
NOT_TENSORRT = {
    "append": "list.append",
    "builder": "trt_build.ParsedNetwork.builder (our dataclass)",
    "float32": "numpy.float32",
    "itemsize": "numpy ndarray.itemsize",
    "logger": "trt_build.ParsedNetwork.logger (our dataclass)",
    "metadata": "EngineFile.metadata / ModelInfo.metadata (ONNX metadata_props)",
    "precision": "Contract.precision / EngineFile.precision",
    "release": "CudaDevice.release()",
    "update": "hashlib update",
}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _major(snap: dict) -> int:
    return int(snap["tensorrt_version"].split(".")[0])


def _split_entry(entry: str) -> tuple[str, int | None]:
    name, _, arity = entry.partition("/")
    return name, (int(arity) if arity else None)


def _resolve(snap: dict, name: str) -> str | None:
    """Kind of ``name`` ('Class', 'Class.member', 'Class.Nested.member', 'function')."""
    classes = snap["classes"]
    if "." not in name:
        if name in classes:
            return "class"
        if name in snap["functions"]:
            return "function"
        return "other" if name in snap["other"] else None
    owner, _, member = name.rpartition(".")
    if owner in classes:
        return classes[owner].get(member)
    return None


def _split_params(params: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in params:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _accepts(sig: str, n: int) -> bool:
    """Does a pybind11/Python signature line accept ``n`` positional arguments (self excluded)?"""
    m = re.match(r"^\w+\((.*)\)(?:\s*->.*)?$", sig)
    if m is None:
        return False
    params = _split_params(m.group(1))
    if params and params[0].split(":")[0].strip() == "self":
        params = params[1:]
    if any(p.startswith("*") for p in params):
        return True
    required = sum(1 for p in params if "=" not in p)
    return required <= n <= len(params)


def _code_names() -> tuple[set[str], set[str]]:
    """(attribute names, attribute names + method names + identifier-like strings) in the code."""
    attrs: set[str] = set()
    used: set[str] = set()
    for f in CODE_FILES:
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                attrs.add(node.attr)
            elif isinstance(node, ast.FunctionDef):
                used.add(node.name)
            elif (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"[A-Za-z_]\w*", node.value)
            ):
                used.add(node.value)
    return attrs, used | attrs


def test_snapshots_cover_tensorrt_10_and_11() -> None:
    majors = {_major(_load(p)) for p in SNAPSHOTS}
    assert {10, 11} <= majors, f"snapshots {SNAPSHOTS} must cover TensorRT 10.x and 11.x"
    assert majors <= set(TRT_FEATURES), f"no TRT_FEATURES row for majors {majors}"


@pytest.mark.parametrize("snapshot", SNAPSHOTS, ids=lambda p: p.stem)
def test_every_touched_name_exists(snapshot: Path) -> None:
    snap = _load(snapshot)
    missing = [e for e in TRT_API if _resolve(snap, _split_entry(e)[0]) is None]
    feats = features_for(snap["tensorrt_version"])
    missing += [
        f"NetworkDefinitionCreationFlag.{n}"
        for n in feats.network_flags
        if _resolve(snap, f"NetworkDefinitionCreationFlag.{n}") != "value"
    ]
    missing += [
        f"BuilderFlag.{n}"
        for n in feats.strict_fp32_clear
        if _resolve(snap, f"BuilderFlag.{n}") != "value"
    ]
    assert not missing, f"TensorRT {snap['tensorrt_version']} lacks {missing}"


@pytest.mark.parametrize("snapshot", SNAPSHOTS, ids=lambda p: p.stem)
def test_every_call_matches_a_signature(snapshot: Path) -> None:
    snap = _load(snapshot)
    bad = []
    for entry in TRT_API:
        name, arity = _split_entry(entry)
        if arity is None:
            continue
        kind = _resolve(snap, name)
        if kind not in ("method", "function"):
            bad.append(f"{entry}: is a {kind}, not callable")
            continue
        sigs = snap["signatures"].get(name)
        if not sigs:
            bad.append(f"{entry}: no signature recorded")
        elif not any(_accepts(s, arity) for s in sigs):
            bad.append(f"{entry}: none of {sigs} takes {arity} positional argument(s)")
    assert not bad, f"TensorRT {snap['tensorrt_version']}: " + "; ".join(bad)


def test_weak_typing_flags_really_gone_in_11() -> None:
    """The reason for the feature table: 11.x has no FP16/INT8 flags, 10.x does."""
    by_major = {_major(s): s for s in map(_load, SNAPSHOTS)}
    assert _resolve(by_major[10], "BuilderFlag.FP16") == "value"
    assert _resolve(by_major[11], "BuilderFlag.FP16") is None
    assert _resolve(by_major[11], "BuilderFlag.INT8") is None
    assert _resolve(by_major[10], "NetworkDefinitionCreationFlag.EXPLICIT_BATCH") == "value"
    assert _resolve(by_major[11], "NetworkDefinitionCreationFlag.EXPLICIT_BATCH") is None


def test_code_uses_only_listed_tensorrt_names() -> None:
    attrs, _ = _code_names()
    universe: set[str] = set()
    for snap in map(_load, SNAPSHOTS):
        universe |= set(snap["classes"]) | set(snap["functions"]) | set(snap["other"])
        for members in snap["classes"].values():
            universe |= set(members)
    listed = {part for e in TRT_API for part in _split_entry(e)[0].split(".")}
    unlisted = sorted((attrs & universe) - listed - set(NOT_TENSORRT))
    assert not unlisted, (
        f"code touches TensorRT names missing from TRT_API: {unlisted} (add them, or to "
        "NOT_TENSORRT if used on another object)"
    )
    needless = sorted(set(NOT_TENSORRT) - ((attrs & universe) - listed))
    assert not needless, f"NOT_TENSORRT entries no longer needed: {needless}"


def test_listed_names_are_used_by_the_code() -> None:
    _, used = _code_names()
    stale = [e for e in TRT_API if _split_entry(e)[0].split(".")[-1] not in used]
    assert not stale, f"TRT_API lists names the code never touches: {stale}"


def test_signature_parser_is_not_vacuous() -> None:
    assert _accepts("f(self: trt.X, a: int, b: int = 0) -> None", 1)
    assert _accepts("f(self: trt.X, a: int, b: int = 0) -> None", 2)
    assert not _accepts("f(self: trt.X, a: int, b: int = 0) -> None", 3)
    assert not _accepts("f(self: trt.X, a: List[trt.Dims], b: Dict[str, int]) -> None", 1)
    assert _accepts("nptype(trt_type)", 1)


def test_snapshots_are_reproducible(tmp_path: Path) -> None:
    """Regenerate every snapshot from the real wheels and compare with the committed files."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler to build the stub TensorRT libraries")
    try:
        for spec in snapmod.SPECS:
            snapmod.fetch_wheel(spec, snapmod.DEFAULT_CACHE, timeout=90)
    except (subprocess.SubprocessError, RuntimeError, OSError) as e:
        pytest.skip(f"cannot fetch the TensorRT bindings wheels here: {str(e)[:200]}")
    written = snapmod.write_snapshots(tmp_path, snapmod.DEFAULT_CACHE)
    assert len(written) == len(SNAPSHOTS)
    for p in written:
        assert _load(p) == _load(SNAP_DIR / p.name), f"{p.name} differs from the committed one"
