"""Engine file (runtime/engine_file.py): header round trip and every refusal, no TensorRT needed."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_model import tiny_contract

from spade_edge.runtime.container import HEADER, read_container, write_container
from spade_edge.runtime.engine_file import (
    ENGINE_MAGIC,
    TensorSpec,
    build_manifest,
    check_tensorrt_version,
    describe,
    normalize_compute_capability,
    read_engine_file,
    write_engine_file,
)
from spade_edge.runtime.errors import CompatibilityError, FormatError, InputError
from spade_edge.runtime.fileio import write_atomic

FP = "ab" * 32
PLAN = bytes(range(256)) * 40  # 10 KiB of non-trivial bytes


def io_specs(contract: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    s = contract.image_size
    inputs = [TensorSpec(contract.input_name, "float32", (-1, 3, s, s))]
    outputs = [
        TensorSpec(lv.name, "float32", (-1, lv.height, lv.width, lv.channels))
        for lv in contract.levels
    ]
    outputs.append(TensorSpec(contract.pooled_name, "float32", (-1, contract.pooled_dim)))
    return inputs, outputs


def fields(**over: Any) -> dict[str, Any]:
    c = over.pop("contract", tiny_contract(32))
    inputs, outputs = io_specs(c)
    f = {
        "contract": c,
        "fingerprint": FP,
        "tensorrt_version": "10.3.0",
        "gpu_name": "Orin",
        "compute_capability": (8, 7),
        "inputs": inputs,
        "outputs": outputs,
        "max_batch": 8,
        "opt_batch": 4,
        "build": {"workspace_mb": 256},
        "source": {"onnx_name": "tiny.onnx"},
        "onnx_metadata": {"spade_edge.lineage": "{}"},
        "created": "2026-01-01T00:00:00+00:00",
    }
    f.update(over)
    return f


@pytest.fixture
def engine(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.engine"
    write_engine_file(p, PLAN, **fields())
    return p


def test_round_trip(engine: Path) -> None:
    with read_engine_file(engine, verify=True) as ef:
        assert ef.version == 1
        assert ef.fingerprint == FP
        assert ef.contract == tiny_contract(32)
        assert ef.tensorrt_version == "10.3.0"
        assert ef.compute_capability == "8.7"
        assert ef.gpu_name == "Orin"
        assert ef.precision == "fp32"
        assert (ef.max_batch, ef.opt_batch) == (8, 4)
        assert [t.name for t in ef.outputs] == ["layer1", "layer2", "layer3", "pooled"]
        assert ef.outputs[0].per_image_shape == (8, 8, 12)
        assert ef.plan().tobytes() == PLAN
        assert ef.plan().dtype == np.uint8
        assert ef.manifest["build"] == {"workspace_mb": 256}
        assert ef.parent_fingerprint is None
        assert ef.metadata == {"spade_edge.lineage": "{}"}
    d = describe(engine)
    json.dumps(d)  # spade-inspect prints it as JSON
    assert d["kind"] == "engine"
    assert d["plan_bytes"] == len(PLAN)
    assert d["model_fingerprint"] == FP
    assert d["tensorrt_version"] == "10.3.0"
    assert d["compute_capability"] == "8.7"
    assert d["levels"][2] == {"name": "layer3", "stride": 16, "shape": [2, 2, 24]}


def test_same_inputs_same_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.engine", tmp_path / "b.engine"
    write_engine_file(a, PLAN, **fields())
    write_engine_file(b, memoryview(PLAN), **fields())
    assert a.read_bytes() == b.read_bytes()


def test_wrong_magic(tmp_path: Path) -> None:
    gal = tmp_path / "gallery.bin"
    write_container(gal, b"SPADEGAL", 1, {"x": 1}, {"a": np.zeros(3, np.float16)})
    with pytest.raises(FormatError, match=r"not a spade-edge TensorRT engine.*gallery"):
        read_engine_file(gal)
    onnx_like = tmp_path / "model.onnx"
    onnx_like.write_bytes(b"\x08\x08\x12\x04test" + bytes(100))
    with pytest.raises(FormatError, match="ONNX"):
        read_engine_file(onnx_like)
    with pytest.raises(FormatError, match="not a spade-edge TensorRT engine"):
        describe(onnx_like)


def test_wrong_version(engine: Path) -> None:
    raw = bytearray(engine.read_bytes())
    struct.pack_into("<I", raw, 8, 2)
    engine.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="format version 2 is not supported"):
        read_engine_file(engine)


@pytest.mark.parametrize("keep", [0, 5, 30, 56, 200, -100, -1])
def test_truncated(engine: Path, keep: int) -> None:
    raw = engine.read_bytes()
    engine.write_bytes(raw[:keep] if keep >= 0 else raw[: len(raw) + keep])
    with pytest.raises(FormatError, match=r"truncated|not a spade-edge|is empty"):
        read_engine_file(engine)


def test_corrupt_plan_caught_by_verify(engine: Path) -> None:
    raw = bytearray(engine.read_bytes())
    raw[-10] ^= 0xFF
    engine.write_bytes(bytes(raw))
    read_engine_file(engine).close()  # open is O(1): the plan is not hashed
    with pytest.raises(FormatError, match="corrupt"):
        read_engine_file(engine, verify=True)
    with pytest.raises(FormatError, match="corrupt"):
        describe(engine, verify=True)


def _rewrite(path: Path, edit: Any, blobs: dict[str, Any] | None = None) -> None:
    """Write a container with an edited manifest (bypassing write_engine_file's validation)."""
    with read_container(path, ENGINE_MAGIC, (1,)) as c:
        m = json.loads(json.dumps(c.manifest))
        if blobs is None:
            blobs = {"plan": bytes(c.blob("plan"))}
    edit(m)
    write_container(path, ENGINE_MAGIC, 1, m, blobs)


def _set(key: str, value: Any) -> Any:
    return lambda m: m.__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.pop("tensorrt_version"), "lacks field 'tensorrt_version'"),
        (_set("max_batch", "8"), "'max_batch' must be int"),
        (_set("max_batch", True), "'max_batch' must be int"),
        (_set("max_batch", 0), "'max_batch' 0 out of range"),
        (_set("opt_batch", 9), "'opt_batch' 9 not in 1..max"),
        (_set("model_fingerprint", "xyz"), "'model_fingerprint' is malformed"),
        (_set("kind", "something else"), "field 'kind'"),
        (_set("precision", "fp16"), "differs from its contract"),
        (_set("precision", "int4"), "'precision'"),
        (_set("compute_capability", "8"), "compute capability '8'"),
        (_set("compute_capability", "08.7"), "not canonical"),
        (_set("tensorrt_version", "ten"), "TensorRT version 'ten'"),
        (lambda m: m["contract"].__setitem__("version", 99), "contract version 99"),
        (lambda m: m["inputs"][0].__setitem__("shape", [1, 3, 32, 32]), "dynamic batch first"),
        (lambda m: m["inputs"][0].__setitem__("name", "x"), "do not match the contract"),
        (lambda m: m["inputs"][0].__setitem__("dtype", "float128"), "dtype 'float128'"),
        (lambda m: m["outputs"].pop(), "do not match the contract"),
        (lambda m: m["outputs"][0].__setitem__("shape", [-1, 12, 8, 8]), "channels-last"),
        (lambda m: m["outputs"].append(dict(m["outputs"][0])), "repeats a tensor name"),
        (_set("build", []), "'build' must be dict"),
        (_set("onnx_metadata", {"a": 1}), "'onnx_metadata' must map str to str"),
    ],
)
def test_manifest_field_refusals(engine: Path, edit: Any, match: str) -> None:
    _rewrite(engine, edit)
    with pytest.raises(FormatError, match=match) as ei:
        read_engine_file(engine)
    assert str(engine) in str(ei.value)


def test_plan_blob_required(engine: Path) -> None:
    _rewrite(engine, lambda m: None, blobs={"weights": np.zeros(4, np.uint8)})
    with pytest.raises(FormatError, match="no non-empty uint8 blob 'plan'"):
        read_engine_file(engine)
    _rewrite(engine, lambda m: None, blobs={"plan": np.zeros(4, np.float32)})
    with pytest.raises(FormatError, match="blob 'plan'"):
        read_engine_file(engine)
    _rewrite(engine, lambda m: None, blobs={"plan": np.ones(4, np.uint8), "x": np.ones(1)})
    with pytest.raises(FormatError, match="unexpected blobs"):
        read_engine_file(engine)


def test_write_refuses_invalid_and_keeps_old_file(engine: Path) -> None:
    before = engine.read_bytes()
    _, outputs = io_specs(tiny_contract(32))
    with pytest.raises(FormatError, match="do not match the contract"):
        write_engine_file(engine, PLAN, **fields(outputs=outputs[:-1]))
    with pytest.raises(FormatError, match="empty plan"):
        write_engine_file(engine, b"", **fields())
    with pytest.raises(FormatError, match="opt_batch"):
        write_engine_file(engine, PLAN, **fields(opt_batch=16))
    assert engine.read_bytes() == before
    assert [p.name for p in engine.parent.iterdir()] == [engine.name]  # no temp left behind


@pytest.mark.parametrize(
    ("built", "runtime", "ok"),
    [
        ("10.3.0", "10.3.0", True),
        ("10.3.0", "10.3.0.30", True),  # pip wheel vs JetPack string of the same release
        ("10.13.3.9.post1", "10.13.3.9", True),  # packaging suffix only
        ("10.3.0.26", "10.3.0.30", False),
        ("10.3.0", "10.4.0", False),
        ("10.16.1.11", "11.4.0.106", False),
        ("11.4.0.106", "11.4.1", False),
    ],
)
def test_tensorrt_version_rule(built: str, runtime: str, ok: bool) -> None:
    if ok:
        check_tensorrt_version(built, runtime, "x.engine")
    else:
        with pytest.raises(CompatibilityError) as ei:
            check_tensorrt_version(built, runtime, "x.engine")
        assert built in str(ei.value) and runtime in str(ei.value)


def test_refuses_other_tensorrt_version(engine: Path) -> None:
    with read_engine_file(engine) as ef, pytest.raises(CompatibilityError) as ei:
        ef.check_runtime("11.4.0.106", "8.7", "Orin")
    msg = str(ei.value)
    assert "10.3.0" in msg and "11.4.0.106" in msg and str(engine) in msg
    assert "rebuild" in msg


def test_refuses_other_compute_capability(engine: Path) -> None:
    with read_engine_file(engine) as ef:
        ef.check_runtime("10.3.0", "8.7", "Orin")  # same: fine
        with pytest.raises(CompatibilityError) as ei:
            ef.check_runtime("10.3.0", "9.0", "NVIDIA H200")
    msg = str(ei.value)
    assert "8.7" in msg and "9.0" in msg and "Orin" in msg and "H200" in msg


def test_compute_capability_forms() -> None:
    assert normalize_compute_capability((8, 7)) == "8.7"
    assert normalize_compute_capability("9.0") == "9.0"
    assert normalize_compute_capability(" 10.1 ") == "10.1"
    for bad in ("87", "8.x", (8,), (8, 7, 1), (8, -1)):
        with pytest.raises(FormatError):
            normalize_compute_capability(bad)  # type: ignore[arg-type]


def test_derived_engine_exposes_parent_fingerprint(tmp_path: Path) -> None:
    c = tiny_contract(32).with_precision("int8", parent_fingerprint="cd" * 32)
    p = tmp_path / "int8.engine"
    write_engine_file(p, PLAN, **fields(contract=c))
    with read_engine_file(p) as ef:
        assert ef.precision == "int8"
        assert ef.parent_fingerprint == "cd" * 32
        assert ef.fingerprint == FP


def test_gallery_of_another_model_is_refused(engine: Path, tmp_path: Path) -> None:
    """The engine exposes the model fingerprint; the compatibility rule refuses a mismatch."""
    from spade_edge.runtime.compat import check_gallery

    gallery_mod = pytest.importorskip("spade_edge.runtime.gallery")
    c = tiny_contract(32)
    rng = np.random.default_rng(0)
    pooled = rng.random((2, c.pooled_dim), dtype=np.float32)
    levels = [rng.random((2, lv.height, lv.width, lv.channels), np.float32) for lv in c.levels]
    gpath = tmp_path / "gallery.bin"
    other_fp = "ef" * 32
    sources = [{"name": f"{i}.png", "sha256": f"{i:064x}"} for i in range(2)]
    gallery_mod.write_gallery(gpath, c, other_fp, pooled, levels, sources=sources)
    with (
        gallery_mod.Gallery.open(gpath) as gal,
        read_engine_file(engine) as ef,
        pytest.raises(CompatibilityError) as ei,
    ):
        check_gallery(gal, ef, str(engine))
    assert FP in str(ei.value) or FP[:12] in str(ei.value)
    assert other_fp in str(ei.value) or other_fp[:12] in str(ei.value)
    with read_engine_file(engine) as ef:
        # same fingerprint: accepted
        gallery_mod.write_gallery(gpath, c, ef.fingerprint, pooled, levels, sources=sources)
        with gallery_mod.Gallery.open(gpath) as gal:
            assert check_gallery(gal, ef, str(engine)) is False  # the packing model itself


def test_write_atomic_raw_bytes(tmp_path: Path) -> None:
    """Raw plans and timing caches go through fileio.write_atomic (bytes or memoryview)."""
    p = tmp_path / "raw.plan"
    write_atomic(p, b"abc")
    write_atomic(p, memoryview(b"defg"))
    assert p.read_bytes() == b"defg"
    with pytest.raises(InputError, match="cannot write"):
        write_atomic(tmp_path / "missing" / "x.plan", b"x")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["raw.plan"]


def test_build_manifest_is_json_and_canonical() -> None:
    m = build_manifest(**fields())
    assert m["compute_capability"] == "8.7"
    assert m["opt_batch"] == 4
    assert json.loads(json.dumps(m)) == m
    assert HEADER.size == 56
