"""TensorRT engine build + runner.

Part 1 (always runs, CPU only): export/trt_build.py and runtime/runners/trt.py driven end to
end through strict fakes of ``tensorrt`` and ``pycuda.driver`` (spade_edge_testing): enums
and members come from snapshots of the real 10.3 and 11.4 bindings, the fake engine computes
with ONNX Runtime CPU and writes into fake device memory at the addresses the runner bound.
This tests OUR logic (flags per version, profile, workspace, timing cache, precision check,
engine file, buffer sizing/offsets, shape caching, context push/pop, stale-feature guard,
refusals), not TensorRT.

Part 2 (marked trt+gpu; runs only where ``tensorrt`` imports and a CUDA GPU is present):
real builds compared with ONNX Runtime CPU, fp32 rel < 1e-3 and fp16 rel < 1e-2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from tiny_model import graph_fingerprint, make_tiny_model

from spade_edge.runtime.contract import (
    METADATA_CONTRACT_KEY,
    METADATA_FINGERPRINT_KEY,
    Contract,
)
from spade_edge.runtime.engine_file import read_engine_file, write_engine_file
from spade_edge.runtime.errors import (
    BackendUnavailableError,
    CompatibilityError,
    ConfigError,
    ExportError,
    FormatError,
    InputError,
    SpadeError,
)
from spade_edge.runtime.runners import Features, open_runner
from spade_edge.runtime.runners.ort import OrtRunner
from spade_edge_testing import fake_tensorrt as fakes

onnx = pytest.importorskip("onnx")

FAKE_VERSIONS = ("10.3.0", "11.4.0.106")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a-b| / max|b| (the project's parity measure)."""
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def relabel(src: Path, dst: Path, precision: str, model: Any = None) -> Path:
    """Copy a spade-edge ONNX with its contract claiming ``precision`` (derived-model metadata)."""
    m = model if model is not None else onnx.load(str(src))
    meta = {p.key: p.value for p in m.metadata_props}
    parent = meta[METADATA_FINGERPRINT_KEY]
    c = Contract.from_json(meta[METADATA_CONTRACT_KEY]).with_precision(precision, parent)
    del m.metadata_props[:]
    onnx.helper.set_model_props(
        m, {METADATA_CONTRACT_KEY: c.to_json(), METADATA_FINGERPRINT_KEY: graph_fingerprint(m)}
    )
    dst.write_bytes(m.SerializeToString())
    return dst


def qdq_model(src: Path, dst: Path) -> Path:
    """A real Q/DQ INT8 model of the tiny net (ORT quantize_static, TensorRT-style settings)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter(
                [{"image": rng.standard_normal((2, 3, 32, 32), np.float32)} for _ in range(4)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    tmp = dst.with_suffix(".q.onnx")
    quantize_static(
        str(src),
        str(tmp),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return relabel(src, dst, "int8", onnx.load(str(tmp)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx", image_size=32)


@pytest.fixture(params=FAKE_VERSIONS)
def fake(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    world = fakes.World()
    trt = fakes.install(monkeypatch, request.param, world)
    return SimpleNamespace(world=world, trt=trt, version=request.param, mp=monkeypatch)


def build(onnx_path: Path, out: Path, **kw: Any) -> Any:
    from spade_edge.export.trt_build import build_engine

    return build_engine(onnx_path, out, **kw)


# ------------------------------------------------------------------------------ part 1: fakes


@pytest.mark.parametrize("version", FAKE_VERSIONS)
def test_fakes_offer_only_real_api(version: str) -> None:
    world = fakes.World()
    assert fakes.check_against_snapshot(fakes.make_fake_tensorrt(version, world), version) == []


def test_build_engine_file(fake: SimpleNamespace, tiny: Path, tmp_path: Path) -> None:
    eng, tc, raw = tmp_path / "t.engine", tmp_path / "t.cache", tmp_path / "t.plan"
    info = build(tiny, eng, max_batch=4, workspace_mb=64, timing_cache=tc, raw_plan=raw)
    assert info.tensorrt_version == fake.version
    assert (info.gpu_name, info.compute_capability) == ("Fake GPU", "8.7")
    assert (info.max_batch, info.opt_batch, info.precision) == (4, 4, "fp32")
    assert info.network.layers > 0 and info.network.qdq_layers == 0
    rec = fake.world.builds[-1]
    assert rec["strongly_typed"] is True
    assert rec["cleared"] == ["TF32"]  # fp32 means fp32
    assert rec["pools"] == {"WORKSPACE": 64 << 20}
    assert rec["profile"] == [[1, 3, 32, 32], [4, 3, 32, 32], [4, 3, 32, 32]]
    # the version table, not an if: 10.x sets STRONGLY_TYPED, 11.x sets no flag at all
    strongly_bit = 1 << int(fake.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert rec["flags"] == (strongly_bit if fake.version.startswith("10.") else 0)
    with read_engine_file(eng, verify=True) as ef:
        assert ef.fingerprint == info.fingerprint
        assert ef.tensorrt_version == fake.version and ef.compute_capability == "8.7"
        assert ef.plan().tobytes() == raw.read_bytes()
        assert ef.manifest["build"]["cleared_builder_flags"] == ["TF32"]
        assert ef.manifest["source"]["onnx_name"] == "tiny.onnx"
    from spade_edge.runtime.model_meta import read_model_info

    assert info.fingerprint == read_model_info(tiny).fingerprint
    assert json.loads(tc.read_bytes())["entries"] > 0
    assert fake.world.ctx_stack == [] and fake.world.retained == fake.world.detached == 1


def test_timing_cache_is_reused_and_foreign_cache_ignored(
    fake: SimpleNamespace, tiny: Path, tmp_path: Path
) -> None:
    tc = tmp_path / "t.cache"
    first = build(tiny, tmp_path / "a.engine", max_batch=2, timing_cache=tc)
    assert first.timing_cache_loaded is False
    second = build(tiny, tmp_path / "b.engine", max_batch=2, timing_cache=tc)
    assert second.timing_cache_loaded is True
    assert json.loads(tc.read_bytes())["entries"] == 2 * first.network.layers
    tc.write_text(json.dumps({"device": "Other GPU/9.9", "entries": 7}))
    third = build(tiny, tmp_path / "c.engine", max_batch=2, timing_cache=tc)
    assert third.timing_cache_loaded is False
    assert json.loads(tc.read_bytes())["device"] == f"Fake GPU/{fake.version}"


def test_opt_batch_and_tf32_options(fake: SimpleNamespace, tiny: Path, tmp_path: Path) -> None:
    info = build(tiny, tmp_path / "e.engine", max_batch=8, opt_batch=2, tf32=True)
    rec = fake.world.builds[-1]
    assert rec["profile"][1] == [2, 3, 32, 32] and rec["profile"][2] == [8, 3, 32, 32]
    assert rec["cleared"] == [] and rec["pools"] == {}
    assert info.opt_batch == 2


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"max_batch": 0}, "max_batch"),
        ({"max_batch": 4, "opt_batch": 5}, "opt_batch"),
        ({"workspace_mb": 0}, "workspace_mb"),
        ({"max_batch": 2.5}, "max_batch"),
    ],
)
def test_bad_options(fake: SimpleNamespace, tiny: Path, tmp_path: Path, kw: dict, match: str):
    with pytest.raises(ConfigError, match=match):
        build(tiny, tmp_path / "x.engine", **kw)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs(fake: SimpleNamespace, tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        build(tmp_path / "missing.onnx", tmp_path / "x.engine")
    with pytest.raises(InputError, match="output folder"):
        build(tiny, tmp_path / "no" / "x.engine")
    plain = tmp_path / "plain.onnx"
    m = onnx.load(str(tiny))
    del m.metadata_props[:]
    plain.write_bytes(m.SerializeToString())
    with pytest.raises(FormatError, match="not a spade-edge model"):
        build(plain, tmp_path / "x.engine")
    assert not (tmp_path / "x.engine").exists()


@pytest.mark.parametrize(("label", "match"), [("int8", "no Q/DQ"), ("fp16", "no half")])
def test_precision_label_must_match_the_graph(
    fake: SimpleNamespace, tiny: Path, tmp_path: Path, label: str, match: str
) -> None:
    lying = relabel(tiny, tmp_path / "lying.onnx", label)
    with pytest.raises(ExportError, match=match):
        build(lying, tmp_path / "x.engine")
    assert not (tmp_path / "x.engine").exists()


def test_fp16_graph_builds_as_fp16(fake: SimpleNamespace, tiny: Path, tmp_path: Path) -> None:
    from spade_edge.calibration.fp16 import convert_fp16

    f16 = convert_fp16(tiny, tmp_path / "tiny.fp16.onnx")
    info = build(f16, tmp_path / "f16.engine", max_batch=2)
    assert info.precision == "fp16" and info.network.half_tensors > 0
    from spade_edge.runtime.model_meta import read_model_info

    with read_engine_file(tmp_path / "f16.engine") as ef:
        assert ef.parent_fingerprint == read_model_info(tiny).fingerprint
        assert ef.fingerprint != ef.parent_fingerprint
        assert [t.dtype for t in ef.inputs] == ["float32"]  # fp32 I/O kept
    # the lineage travels into the engine: same gallery-reuse decision as for the ONNX
    from spade_edge.runtime.compat import judge

    onnx_info = read_model_info(f16)
    r = open_runner(tmp_path / "f16.engine")
    try:
        assert r.metadata["spade_edge.lineage"] == onnx_info.metadata["spade_edge.lineage"]
        parent = read_model_info(tiny)
        assert judge(parent.fingerprint, parent.contract, r) == judge(
            parent.fingerprint, parent.contract, onnx_info
        )
    finally:
        r.close()


def test_int8_qdq_graph_builds_as_int8(fake: SimpleNamespace, tiny: Path, tmp_path: Path) -> None:
    q = qdq_model(tiny, tmp_path / "tiny.int8.onnx")
    info = build(q, tmp_path / "q.engine", max_batch=2)
    assert info.precision == "int8" and info.network.qdq_layers > 0
    # an fp32 label on a Q/DQ graph is refused too
    with pytest.raises(ExportError, match="contract says fp32"):
        build(relabel_fp32(q, tmp_path / "q32.onnx"), tmp_path / "y.engine")


def relabel_fp32(src: Path, dst: Path) -> Path:
    m = onnx.load(str(src))
    meta = {p.key: p.value for p in m.metadata_props}
    d = json.loads(meta[METADATA_CONTRACT_KEY])
    d["precision"], d["parent_fingerprint"] = "fp32", None
    del m.metadata_props[:]
    onnx.helper.set_model_props(
        m, {METADATA_CONTRACT_KEY: json.dumps(d), METADATA_FINGERPRINT_KEY: graph_fingerprint(m)}
    )
    dst.write_bytes(m.SerializeToString())
    return dst


def test_tensorrt_missing_says_what_to_install(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError) as ei:
        build(tiny, tmp_path / "x.engine")
    assert "pip install 'spade-edge[trt]'" in str(ei.value) and "JetPack" in str(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_too_old_tensorrt_refused(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    world = fakes.World()
    trt = fakes.install(monkeypatch, "10.3.0", world)
    trt.__version__ = "8.6.1"  # type: ignore[attr-defined]
    with pytest.raises(BackendUnavailableError, match=r"8\.6\.1 is too old"):
        build(tiny, tmp_path / "x.engine")


def test_runner_matches_ort_and_keeps_buffers(
    fake: SimpleNamespace, tiny: Path, tmp_path: Path
) -> None:
    eng = tmp_path / "t.engine"
    build(tiny, eng, max_batch=4)
    w = fake.world
    ref = OrtRunner(tiny)
    r = open_runner(eng)  # auto -> trt
    try:
        assert r.name == "trt" and r.max_batch == 4 and r.precision == "fp32"
        assert r.fingerprint == ref.fingerprint and r.contract == ref.contract
        allocs_after_load = w.allocs
        assert allocs_after_load == 5  # input + 3 levels + pooled, once
        rng = np.random.default_rng(1)
        for n in (3, 1, 4, 4, 2):
            x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
            f = r.infer(x)
            assert f.device and f.batch == n and f.dtypes == ("float32",) * 4
            assert all(int(p) in w.memory for p in [*f.levels, f.pooled])
            h = f.to_host()
            want = ref.infer(x)
            for got, exp in zip([*h.levels, h.pooled], [*want.levels, want.pooled], strict=True):
                assert got.shape == exp.shape and got.dtype == np.float32
                np.testing.assert_array_equal(got, exp)
            assert h.image(n - 1).pooled.shape == (1, 24)
        assert w.allocs == allocs_after_load  # no allocation per batch
        assert w.set_input_shape_calls == 4  # 3, 1, 4, (4 cached), 2
        assert w.executions == 5
        assert w.ctx_stack == []
    finally:
        r.close()
        ref.close()
    assert w.frees == w.allocs and w.memory == {}
    assert w.retained == w.detached
    r.close()  # idempotent


def test_runner_guards(fake: SimpleNamespace, tiny: Path, tmp_path: Path) -> None:
    eng = tmp_path / "t.engine"
    build(tiny, eng, max_batch=4)
    with pytest.raises(ConfigError, match=r"1\.\.4"):
        open_runner(eng, backend="trt", max_batch=5)
    r = open_runner(eng, backend="trt", max_batch=2)
    try:
        x = np.zeros((3, 3, 32, 32), np.float32)
        with pytest.raises(InputError, match=r"outside the engine's range 1\.\.2"):
            r.infer(x)
        with pytest.raises(InputError, match="does not match the contract"):
            r.infer(np.zeros((1, 3, 16, 16), np.float32))
        f1 = r.infer(x[:1])
        f2 = r.infer(x[:2])
        with pytest.raises(SpadeError, match="overwritten by a later infer"):
            f1.to_host()
        assert f2.to_host().batch == 2
    finally:
        r.close()
    with pytest.raises(InputError, match="closed"):
        r.infer(x[:1])


def test_runner_refuses_engine_from_other_tensorrt(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = tmp_path / "t.engine"
    with monkeypatch.context() as mp:
        fakes.install(mp, "10.3.0", fakes.World())
        build(tiny, eng, max_batch=2)
    world = fakes.World()
    fakes.install(monkeypatch, "11.4.0.106", world)
    with pytest.raises(CompatibilityError) as ei:
        open_runner(eng)
    assert "10.3.0" in str(ei.value) and "11.4.0.106" in str(ei.value)
    assert world.allocs == 0 and world.retained == world.detached


def test_runner_refuses_other_gpu_architecture(
    fake: SimpleNamespace, tiny: Path, tmp_path: Path
) -> None:
    eng = tmp_path / "t.engine"
    build(tiny, eng, max_batch=2)
    fake.world.cc, fake.world.gpu_name = (9, 0), "NVIDIA H200"
    with pytest.raises(CompatibilityError) as ei:
        open_runner(eng)
    msg = str(ei.value)
    assert "8.7" in msg and "9.0" in msg and "Fake GPU" in msg and "H200" in msg


def rewrite_engine(eng: Path, plan: bytes | None = None, **changes: Any) -> None:
    """Write engine file ``eng`` again from its own manifest fields with ``changes`` applied
    (and ``plan`` instead of its plan): a valid file that says something else."""
    with read_engine_file(eng) as ef:
        kw = {
            "contract": ef.contract,
            "fingerprint": ef.fingerprint,
            "tensorrt_version": ef.tensorrt_version,
            "gpu_name": ef.gpu_name,
            "compute_capability": ef.compute_capability,
            "inputs": ef.inputs,
            "outputs": ef.outputs,
            "max_batch": ef.max_batch,
            "opt_batch": ef.opt_batch,
            "build": ef.manifest["build"],
            "source": ef.manifest["source"],
        }
        old_plan = bytes(ef.plan())
    write_engine_file(eng, old_plan if plan is None else plan, **{**kw, **changes})


def test_runner_reports_undeserializable_plan(
    fake: SimpleNamespace, tiny: Path, tmp_path: Path
) -> None:
    eng = tmp_path / "t.engine"
    build(tiny, eng, max_batch=2)
    rewrite_engine(eng, plan=b"not a plan")
    with pytest.raises(FormatError, match=r"could not deserialize the plan.*magic tag"):
        open_runner(eng)
    assert fake.world.allocs == 0 and fake.world.ctx_stack == []


def test_no_gpu_is_backend_unavailable(fake: SimpleNamespace, tiny: Path, tmp_path: Path):
    eng = tmp_path / "t.engine"
    build(tiny, eng, max_batch=2)
    fake.world.device_count = 0
    with pytest.raises(BackendUnavailableError, match="CUDA device 0 does not exist"):
        open_runner(eng)
    with pytest.raises(BackendUnavailableError, match="does not exist"):
        build(tiny, tmp_path / "u.engine")


# ------------------------------------------------------------------------------ part 2: real


def _real_trt_gpu() -> str | None:
    """Why the real-TensorRT tests cannot run here (None if they can)."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as e:
        return f"tensorrt not importable ({e})"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() < 1:
            return "no CUDA GPU"
    except Exception as e:
        return f"pycuda/CUDA not usable ({e})"
    return None


real = pytest.mark.skipif(_real_trt_gpu() is not None, reason=str(_real_trt_gpu()))


@real
@pytest.mark.trt
@pytest.mark.gpu
def test_real_fp32_engine_matches_ort(tiny: Path, tmp_path: Path) -> None:
    eng = tmp_path / "fp32.engine"
    info = build(tiny, eng, max_batch=4, timing_cache=tmp_path / "tc.bin")
    assert info.precision == "fp32"
    with OrtRunner(tiny) as ref, open_runner(eng) as r:
        x = np.random.default_rng(0).standard_normal((4, 3, 32, 32), dtype=np.float32)
        for n in (1, 4, 3):
            f = r.infer(x[:n])
            assert f.device and all(int(p) != 0 for p in f.levels)
            assert_features_close(f.to_host(), ref.infer(x[:n]), 1e-3)


def assert_features_close(got: Features, want: Features, rtol: float) -> None:
    """Every level and the pooled vector: same shape, relative L2 error below ``rtol``."""
    for a, b in zip([*got.levels, got.pooled], [*want.levels, want.pooled], strict=True):
        assert a.shape == b.shape
        assert rel_err(a, b) < rtol


@real
@pytest.mark.trt
@pytest.mark.gpu
def test_real_fp16_engine_matches_ort(tiny: Path, tmp_path: Path) -> None:
    from spade_edge.calibration.fp16 import convert_fp16

    f16 = convert_fp16(tiny, tmp_path / "tiny.fp16.onnx")
    eng = tmp_path / "fp16.engine"
    info = build(f16, eng, max_batch=2)
    assert info.precision == "fp16" and info.network.half_tensors > 0
    with OrtRunner(tiny) as ref, open_runner(eng) as r:  # ref: the fp32 parent on the CPU
        x = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
        assert_features_close(r.infer(x).to_host(), ref.infer(x), 1e-2)


@real
@pytest.mark.trt
@pytest.mark.gpu
def test_real_engine_refuses_tampered_version(tiny: Path, tmp_path: Path) -> None:
    eng = tmp_path / "e.engine"
    build(tiny, eng, max_batch=1)
    rewrite_engine(eng, tensorrt_version="9.9.9")
    with pytest.raises(CompatibilityError, match=r"9\.9\.9"):
        open_runner(eng)


def test_cpu_target_int8_is_refused_before_tensorrt(tmp_path: Path) -> None:
    """A Q/DQ model made for ORT CPU (uint8 activations) must not reach TensorRT's parser."""
    import json

    import onnx

    from spade_edge.export.trt_build import build_engine
    from spade_edge.runtime.contract import METADATA_CONTRACT_KEY
    from spade_edge.runtime.errors import ExportError

    src = make_tiny_model(tmp_path / "m.onnx")
    m = onnx.load(str(src))
    for p in m.metadata_props:
        if p.key == METADATA_CONTRACT_KEY:
            c = json.loads(p.value)
            c["precision"] = "int8"
            c["extra"] = {"quantization": {"target": "cpu"}}
            p.value = json.dumps(c)
    onnx.save(m, str(src))
    with pytest.raises(ExportError, match="int8-target trt"):
        build_engine(src, tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()
