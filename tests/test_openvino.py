"""OpenVINO runner: fp32 features equal ONNX Runtime's; bf16/int8 options; clean errors.
Skips where openvino (extra [openvino]) is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_model import make_tiny_model

from spade_edge.runtime.errors import BackendUnavailableError, ConfigError, InputError
from spade_edge.runtime.runners import open_runner
from spade_edge.runtime.runners.ort import OrtRunner


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx")
    return make_tiny_model(tmp_path_factory.mktemp("ov") / "tiny.onnx")


def _batch(runner, n: int = 3, seed: int = 0) -> np.ndarray:
    s = runner.contract.image_size
    return np.random.default_rng(seed).standard_normal((n, 3, s, s)).astype(np.float32)


def _assert_same_features(a, b, rtol: float, atol: float) -> None:
    assert len(a.levels) == len(b.levels)
    for x, y in zip(a.levels, b.levels, strict=True):
        assert x.shape == y.shape and x.dtype == np.float32
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
    np.testing.assert_allclose(a.pooled, b.pooled, rtol=rtol, atol=atol)


def test_fp32_features_equal_ort(tiny: Path) -> None:
    pytest.importorskip("openvino")
    ov = open_runner(tiny, "openvino")
    ort = OrtRunner(tiny)
    assert (ov.name, ov.contract, ov.fingerprint) == ("openvino", ort.contract, ort.fingerprint)
    assert ov.effective_precision == "f32"
    x = _batch(ov)
    _assert_same_features(ov.infer(x), ort.infer(x), rtol=1e-5, atol=1e-5)
    ov.close()


def test_fp32_features_equal_ort_on_lite0(lite0_onnx: Path) -> None:
    pytest.importorskip("openvino")
    with open_runner(lite0_onnx, "openvino") as ov:
        x = _batch(ov, n=1, seed=1)
        _assert_same_features(ov.infer(x), OrtRunner(lite0_onnx).infer(x), rtol=1e-3, atol=1e-4)


def test_bf16_option_runs_and_says_what_ran(tiny: Path) -> None:
    pytest.importorskip("openvino")
    with open_runner(tiny, "openvino-bf16") as ov:
        assert ov.name == "openvino-bf16" and ov.precision == "bf16"
        f = ov.infer(_batch(ov))
        ref = OrtRunner(tiny).infer(_batch(ov))
        # bf16 keeps ~3 significant digits; where the CPU lacks bf16 units OpenVINO runs fp32
        _assert_same_features(f, ref, rtol=5e-2, atol=5e-2)
        assert ov.effective_precision in ("f32", "bf16")


def test_int8_needs_an_int8_model(tiny: Path) -> None:
    pytest.importorskip("openvino")
    with pytest.raises(ConfigError, match="needs an INT8 model"):
        open_runner(tiny, "openvino-int8")


def test_bad_inputs(tiny: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from spade_edge.runtime.runners.openvino import OpenVinoRunner

    with pytest.raises(InputError, match="not found"):
        OpenVinoRunner(tmp_path / "missing.onnx")
    with pytest.raises(ConfigError, match="precision"):
        OpenVinoRunner(tiny, precision="fp8")
    with OpenVinoRunner(tiny) as r, pytest.raises(InputError, match="does not match"):
        r.infer(np.zeros((1, 3, 8, 8), dtype=np.float32))
    r.close()  # idempotent
    with pytest.raises(InputError, match="closed"):
        r.infer(_batch(r))
    with pytest.raises(ConfigError, match="no option 'precison'"):
        open_runner(tiny, "openvino", precison="bf16")


def test_missing_openvino_says_what_to_install(tiny: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendUnavailableError, match=r"spade-edge\[openvino\]"):
        open_runner(tiny, "openvino")
