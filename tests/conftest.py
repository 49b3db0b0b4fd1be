"""Shared fixtures: real data location, the Lite0 model (exported once per session), tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle"


@pytest.fixture(scope="session")
def bottle_dir() -> Path:
    """MVTec AD bottle (../shared/data); tests that need it skip cleanly without it."""
    if not (BOTTLE / "train" / "good").is_dir():
        pytest.skip(f"real data not found at {BOTTLE}")
    return BOTTLE


@pytest.fixture(scope="session")
def lite0_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EfficientNet-Lite0 with its real ImageNet weights, exported once for the whole session."""
    pytest.importorskip("torch")
    from spade_edge.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("lite0") / "lite0.onnx"
    export_onnx("efficientnet_lite0", out, weights="imagenet")
    return out


@pytest.fixture()
def tiny_onnx(tmp_path: Path) -> Path:
    """A tiny spade-edge model (no torch) for fast runtime tests."""
    from tiny_model import make_tiny_model

    return make_tiny_model(tmp_path / "tiny.onnx", image_size=32)
