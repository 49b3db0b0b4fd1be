"""The --compare-torch yardstick computes the same SPADE protocol (so its speed-up is fair), and
spade-bench's comparison/floor plumbing runs. Timings themselves live in spade-bench only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spade_edge.runtime.gallery import InMemoryGallery
from spade_edge.runtime.matchers.numpy_matcher import NumpyMatcher
from spade_edge.runtime.preprocess import prepare_path
from spade_edge.runtime.runners.ort import OrtRunner


def test_torch_reference_equals_the_runtime(lite0_onnx: Path, bottle_dir: Path) -> None:
    pytest.importorskip("torch")
    from spade_edge.export.torch_reference import TorchReference

    runner = OrtRunner(lite0_onnx)
    c = runner.contract
    train = sorted((bottle_dir / "train" / "good").glob("*.png"))[:4]
    gf = runner.infer(np.stack([prepare_path(p, c).tensor for p in train]))
    gal = InMemoryGallery.from_features(c, gf.levels, gf.pooled)
    x = np.stack(
        [prepare_path(sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[0], c).tensor]
    )
    ref = TorchReference(
        c.backbone,
        "imagenet",
        [np.asarray(lv, dtype=np.float32) for lv in gal.levels],
        np.asarray(gal.pooled, dtype=np.float32),
        k=2,
        image_size=c.image_size,
    )
    ((score, amap),) = ref.score(x)
    want = NumpyMatcher(gal, k_image=2, k_gallery=2).score(runner.infer(x))[0]
    # torch vs ORT features differ in the last bits only; the protocol must be the same
    assert score == pytest.approx(want.image_score, rel=1e-3)
    np.testing.assert_allclose(amap, want.anomaly_map, rtol=2e-3, atol=2e-3 * amap.max())


def test_compare_torch_rows(lite0_onnx: Path, bottle_dir: Path) -> None:
    pytest.importorskip("torch")
    from spade_edge.export.torch_reference import compare_torch

    img = sorted((bottle_dir / "test" / "good").glob("*.png"))[:1]
    rows = compare_torch(
        lite0_onnx,
        img,
        ks=(2,),
        n_gallery=3,
        repeats=1,
        configs=(("default (auto)", "ort", "auto"), ("missing", "no-such-backend", "numpy")),
    )
    by = {r["configuration"]: r for r in rows}
    assert set(by) == {"default (auto)", "torch reference", "missing"}
    assert by["torch reference"]["speedup_vs_torch"] == 1.0
    assert by["default (auto)"]["ms_per_image"] > 0
    assert "unknown runner backend" in by["missing"]["error"]


def test_matrix_peaks_name_the_floor_unit() -> None:
    from spade_edge.runtime.bench import matrix_peaks

    p = matrix_peaks(n=128, repeats=1)
    assert p["best"] in ("fp32", "int8", "bf16") and p[p["best"]] > 0


def test_floor_ignores_emulated_units(monkeypatch) -> None:
    """Without int8/bf16 units the floor is the fp32 rate, however the timings fall."""
    from spade_edge.runtime import bench

    monkeypatch.setenv("SPADE_CPU_FLAGS", "avx2 fma")
    monkeypatch.setattr(bench, "_int8_gemm_ops", lambda n, r: 1e9)
    monkeypatch.setattr(bench, "_bf16_gemm_ops", lambda n, r: (1e9, "f32"))
    assert bench.matrix_peaks(n=64, repeats=1)["best"] == "fp32"
    monkeypatch.setenv("SPADE_CPU_FLAGS", "avx512_vnni")
    assert bench.matrix_peaks(n=64, repeats=1)["best"] == "int8"
    monkeypatch.setattr(bench, "_bf16_gemm_ops", lambda n, r: (2e9, "bf16"))
    assert bench.matrix_peaks(n=64, repeats=1)["best"] == "bf16"
