"""Backend selection (auto|trt|ort|ort-gpu) and its errors, on a machine without TensorRT/GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from test_engine_file import PLAN, fields
from tiny_model import make_tiny_model

from spade_edge.runtime.engine_file import write_engine_file
from spade_edge.runtime.errors import BackendUnavailableError, FormatError, InputError
from spade_edge.runtime.runners import RUNNERS, auto_backend, open_runner
from spade_edge.runtime.runners.ort_gpu import GPU_PROVIDERS, resolve_providers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx")
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny.onnx")


@pytest.fixture
def engine(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.engine"
    write_engine_file(p, PLAN, **fields())
    return p


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import tensorrt`` fail even on a machine that has it."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_auto_picks_trt_for_engine_and_ort_for_onnx(engine: Path, tiny: Path) -> None:
    assert auto_backend(engine) == "trt"
    assert auto_backend(tiny) == "ort"
    assert set(RUNNERS) >= {"ort", "ort-gpu", "trt"}


def test_auto_on_engine_without_tensorrt_says_what_to_install(engine: Path, no_tensorrt: None):
    with pytest.raises(BackendUnavailableError) as ei:
        open_runner(engine)  # auto -> trt
    msg = str(ei.value)
    assert "pip install 'spade-edge[trt]'" in msg
    assert "JetPack" in msg
    assert ei.value.exit_code == 5


def test_trt_requested_without_tensorrt(engine: Path, no_tensorrt: None) -> None:
    with pytest.raises(BackendUnavailableError, match=r"spade-edge\[trt\]"):
        open_runner(engine, backend="trt")


def test_trt_checks_the_file_before_the_backend(tmp_path: Path, tiny: Path, no_tensorrt: None):
    """A broken or foreign file is a FormatError even where TensorRT is missing."""
    bad = tmp_path / "broken.engine"
    bad.write_bytes(b"SPADEENG" + b"\0" * 10)
    with pytest.raises(FormatError, match="truncated"):
        open_runner(bad, backend="trt")
    with pytest.raises(FormatError, match=r"not a spade-edge TensorRT engine.*ONNX"):
        open_runner(tiny, backend="trt")


def test_unknown_backend(tiny: Path) -> None:
    with pytest.raises(InputError, match=r"unknown runner backend 'tensorflow'.*ort-gpu"):
        open_runner(tiny, backend="tensorflow")


def test_ort_cpu_still_default_for_onnx(tiny: Path) -> None:
    r = open_runner(tiny)
    try:
        assert r.name == "ort"
        f = r.infer(np.zeros((2, 3, 32, 32), np.float32))
        assert f.pooled.shape == (2, 24) and not f.device
    finally:
        r.close()


@pytest.mark.parametrize(
    ("provider", "missing"),
    [(None, "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")],
)
def test_ort_gpu_without_provider(tiny: Path, provider: str | None, missing: str) -> None:
    import onnxruntime as ort

    if missing in ort.get_available_providers():
        pytest.skip(f"this ONNX Runtime has {missing}")
    with pytest.raises(BackendUnavailableError) as ei:
        open_runner(tiny, backend="ort-gpu", provider=provider)
    assert missing in str(ei.value)
    assert "onnxruntime-gpu" in str(ei.value)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_ort_gpu_refuses_silent_cpu_fallback(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ORT lists the provider but the session falls back to the CPU: refused, not run."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a real CUDA provider is present")
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*real, "CUDAExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match="fell back to CPUExecutionProvider"):
        open_runner(tiny, backend="ort-gpu", provider="cuda")


def test_provider_names() -> None:
    assert resolve_providers(None) == ["CUDAExecutionProvider"]
    assert resolve_providers(["tensorrt", "cuda", "CUDAExecutionProvider"]) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
    ]
    assert set(GPU_PROVIDERS.values()) == {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
    with pytest.raises(InputError, match="unknown GPU provider 'CPUExecutionProvider'"):
        resolve_providers("CPUExecutionProvider")
    with pytest.raises(InputError, match="no execution provider"):
        resolve_providers([])
