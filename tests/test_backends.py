"""Backend selection (auto|trt|ort|ort-gpu) and its errors, on a machine without TensorRT/GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from test_engine_file import PLAN, fields
from tiny_model import make_tiny_model

from spade_edge.runtime.engine_file import write_engine_file
from spade_edge.runtime.errors import (
    BackendUnavailableError,
    ConfigError,
    FormatError,
    InputError,
)
from spade_edge.runtime.matchers import MATCHERS, open_matcher
from spade_edge.runtime.registry import backend_options, load_backend
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


# ------------------------------------------------------------------------ backend contracts
def _tiny_gallery(tiny: Path):
    from spade_edge.runtime.gallery import InMemoryGallery

    with open_runner(tiny) as r:
        f = r.infer(np.random.default_rng(0).standard_normal((4, 3, 32, 32), dtype=np.float32))
        return InMemoryGallery.from_features(r.contract, f.levels, f.pooled)


def test_unknown_runner_option_is_a_config_error_naming_it(tiny: Path) -> None:
    with pytest.raises(ConfigError, match=r"runner backend 'ort' has no option 'thread'.*threads"):
        open_runner(tiny, backend="ort", thread=2)  # typo of threads
    with pytest.raises(ConfigError, match=r"'ort-gpu' has no option 'devcie'"):
        open_runner(tiny, backend="ort-gpu", devcie=1)


def test_unknown_matcher_option_is_a_config_error_naming_it(tiny: Path) -> None:
    g = _tiny_gallery(tiny)
    with pytest.raises(ConfigError, match=r"matcher backend 'numpy' has no option 'k_imag'"):
        open_matcher(g, "numpy", k_imag=3)
    with pytest.raises(ConfigError, match=r"matcher backend 'cuda' has no option 'devices'"):
        open_matcher(g, "cuda", devices=0)  # refused before pycuda is even needed
    with pytest.raises(ConfigError, match=r"'exact-int8' has no option 'k_galery'.*k_gallery"):
        open_matcher(g, "exact-int8", k_galery=3)


def test_matcher_options_include_the_shared_knn_options() -> None:
    """A matcher forwarding ``**knn`` to KnnMatcher accepts (only) KnnMatcher's options too."""
    knn = ["k_image", "k_gallery", "sigma"]
    for name, extra in (("numpy", []), ("cuda", ["device", "block_rows"])):
        assert backend_options(load_backend(MATCHERS, name, "matcher")) == [*extra, *knn], name


def test_every_backend_declares_thread_safety_and_lifecycle() -> None:
    for table, kind in ((RUNNERS, "runner"), (MATCHERS, "matcher")):
        for name in table:
            try:
                cls = load_backend(table, name, kind)
            except BackendUnavailableError:
                continue  # an optional extra (openvino) not installed here
            assert isinstance(getattr(cls, "thread_safe", None), bool), name
            assert callable(cls.__enter__) and callable(cls.__exit__) and callable(cls.close), name
            assert "_" not in backend_options(cls), name  # no catch-all for options


def test_runner_and_matcher_lifecycle(tiny: Path) -> None:
    x = np.zeros((1, 3, 32, 32), np.float32)
    with open_runner(tiny) as r:
        f = r.infer(x)
    with pytest.raises(InputError, match="closed"):
        r.infer(x)
    r.close()  # idempotent
    g = _tiny_gallery(tiny)
    with open_matcher(g, "numpy", k_image=2, k_gallery=2) as m:
        assert len(m.score(f)) == 1
    with pytest.raises(InputError, match="after close"):
        m.score(f)
    m.close()


def test_detector_locks_unless_both_backends_are_thread_safe(tiny: Path) -> None:
    from spade_edge.runtime.detector import Detector

    g = _tiny_gallery(tiny)
    g.thresholds = None
    with open_runner(tiny) as r, open_matcher(g, "numpy", k_image=2, k_gallery=2) as m:
        assert r.thread_safe and m.thread_safe
        assert Detector(r, g, m)._lock is None
        m.thread_safe = False  # e.g. a GPU matcher
        assert Detector(r, g, m)._lock is not None
