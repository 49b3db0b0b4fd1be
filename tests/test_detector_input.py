"""Detector API on bad input: per-image isolation, the array value convention, bounded maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_support import K, make_gallery, normal_array

from spade_edge.runtime.detector import Detector
from spade_edge.runtime.errors import InputError, SpadeError


@pytest.fixture()
def det(tiny_onnx: Path, tmp_path: Path):
    g = make_gallery(tiny_onnx, tmp_path / "g")
    with Detector.load(tiny_onnx, g, k_image=K, k_gallery=K) as d:
        yield d


def test_nan_image_fails_alone_and_the_batch_goes_on(det: Detector, tmp_path: Path) -> None:
    paths = []
    for i in range(5):
        p = tmp_path / f"p{i}.png"
        Image.fromarray(normal_array(50 + i)).save(p)
        paths.append(p)
    nan = tmp_path / "nan.tif"
    Image.fromarray(np.full((48, 40), np.nan, np.float32), mode="F").save(nan)
    paths.insert(2, nan)
    for bs in (1, 4):
        out = list(det.predict_paths(paths, batch_size=bs))
        assert [p for p, _ in out] == paths
        errs = [(p, r) for p, r in out if isinstance(r, SpadeError)]
        assert [p for p, _ in errs] == [nan]
        assert isinstance(errs[0][1], InputError) and "non-finite" in str(errs[0][1])
        assert all(np.isfinite(r.score) for p, r in out if p != nan)


def test_batch_failure_is_pinned_on_its_image(det: Detector, tmp_path: Path, monkeypatch) -> None:
    """A batch that fails in scoring is retried image by image: only the culprit fails."""
    paths = []
    for i in range(4):
        p = tmp_path / f"q{i}.png"
        Image.fromarray(normal_array(70 + i)).save(p)
        paths.append(p)
    real = det._score_prepared

    def picky(preps):  # a scoring failure caused by one image (as a NaN feature would)
        if any(p.source.endswith("q2.png") for p in preps):
            raise InputError("q2.png refused")
        return real(preps)

    monkeypatch.setattr(det, "_score_prepared", picky)
    out = list(det.predict_paths(paths, batch_size=4))
    bad = [p.name for p, r in out if isinstance(r, SpadeError)]
    assert bad == ["q2.png"]


def test_predict_refuses_bad_arrays_with_typed_errors(det: Detector) -> None:
    with pytest.raises(InputError, match="non-finite"):
        det.predict(np.full((224, 224), np.nan, np.float32))
    good = normal_array(3)
    ref = det.predict(good).score
    f = good / np.float32(255)
    assert det.predict(f).score == pytest.approx(ref, rel=1e-6)
    f[0, 0, 0] = 1.0001  # used to flip the guessed scale (score 3.60 -> 22.38)
    with pytest.raises(InputError, match=r"outside \[0, 1\]"):
        det.predict(f)
    assert det.predict(good.astype(np.float32), white=255).score == pytest.approx(ref, rel=1e-6)


def test_full_map_of_a_huge_image_is_bounded(det: Detector) -> None:
    from spade_edge.runtime import preprocess as pre

    a = np.full((5000, 4000), 120, np.uint8)  # 20 Mpx > DISPLAY_MAX_PIXELS
    res = det.predict(a)
    w, h = res.geometry.display_size
    assert w * h <= pre.DISPLAY_MAX_PIXELS and abs(w / h - 0.8) < 1e-3
    assert res.full_map().shape == (h, w) and res.rgb.shape == (h, w, 3)
    rec = res.to_record()
    assert rec["image"] == "<array>" and "image_b64" not in rec


def test_overlay_in_row_bands_equals_the_whole_image_formula(monkeypatch) -> None:
    from spade_edge.runtime import visualize as vis

    rng = np.random.default_rng(8)
    rgb = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    amap = rng.uniform(0, 50, (37, 23)).astype(np.float32)
    norm = np.clip(amap / 40.0, 0.0, 1.0)
    a = 0.7 * (norm**2)[..., None]
    ref = (rgb * (1 - a) + vis.colormap(norm).astype(np.float32) * a).round().astype(np.uint8)
    monkeypatch.setattr(vis, "_BAND_PIXELS", 50)  # 2 rows per band
    np.testing.assert_array_equal(vis.overlay(rgb, amap, 40.0), ref)


def test_save_maps_writes_overlay_and_mask_on_the_display_grid(det: Detector, tmp_path) -> None:
    from spade_edge.runtime.visualize import save_maps

    res = det.predict(normal_array(4))
    res.pixel_threshold = float(np.median(res.anomaly_map))
    out = save_maps(res, tmp_path, "x")
    assert Image.open(out["overlay"]).size == (40, 48)
    mask = np.asarray(Image.open(out["mask"]))
    np.testing.assert_array_equal(mask > 0, res.defect_mask())
