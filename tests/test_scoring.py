"""CPU scoring pieces against independent references (torch for interpolation, brute force kNN)."""

from __future__ import annotations

import numpy as np
import pytest

from spade_edge.runtime.matchers.numpy_matcher import min_sq_distances, nearest_images
from spade_edge.runtime.scoring import gaussian_blur, upsample_bilinear


@pytest.mark.parametrize(("h", "w", "size"), [(56, 56, 224), (14, 14, 224), (7, 5, 32), (3, 3, 3)])
def test_upsample_matches_torch(h: int, w: int, size: int) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    m = rng.random((h, w), dtype=np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(m)[None, None], size=(size, size), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(upsample_bilinear(m, size), ref, rtol=1e-5, atol=1e-6)


def test_blur_is_normalised_and_reflects() -> None:
    m = np.ones((40, 40), np.float32)
    np.testing.assert_allclose(gaussian_blur(m, 4.0), 1.0, rtol=1e-6)
    d = np.zeros((41, 41), np.float32)
    d[20, 20] = 1.0
    b = gaussian_blur(d, 4.0)
    assert b.sum() == pytest.approx(1.0, rel=1e-5)
    assert b[20, 20] == pytest.approx(1 / (2 * np.pi * 16), rel=0.02)


def test_nearest_images_brute_force_and_ties() -> None:
    rng = np.random.default_rng(1)
    g = rng.standard_normal((30, 16)).astype(np.float32)
    g[7] = g[3]  # exact tie: lower index must come first
    q = g[3] + 0.01
    g64 = g.astype(np.float64)
    sq = (g64**2).sum(1)
    idx, dist = nearest_images(q, g64, sq, 5)
    brute = np.sqrt(((g.astype(np.float64) - q) ** 2).sum(1))
    order = np.lexsort((np.arange(30), brute))[:5]
    assert list(idx[:2]) == [3, 7]
    assert list(idx) == list(order)
    np.testing.assert_allclose(dist, brute[order], rtol=1e-4)
    idx2, _ = nearest_images(q, g64, sq, 5, exclude=3)
    assert 3 not in idx2 and idx2[0] == 7


@pytest.mark.parametrize("tile", [64, 8 * 1024 * 1024])
def test_min_sq_distances_brute_force(tile: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import spade_edge.runtime.matchers.numpy_matcher as nm

    monkeypatch.setattr(nm, "TILE_ELEMENTS", tile)  # exercise the tiled path too
    monkeypatch.setattr(nm, "NARROW_TILE_ELEMENTS", tile)  # (these channels are narrow)
    rng = np.random.default_rng(2)
    lv = rng.standard_normal((6, 5, 7, 8)).astype(np.float16)
    sq = (lv.astype(np.float32) ** 2).sum(-1)
    q = rng.standard_normal((11, 8)).astype(np.float32)
    imgs = np.array([1, 4, 5])
    got = min_sq_distances(q, lv, sq, imgs)
    g = lv[imgs].reshape(-1, 8).astype(np.float64)
    ref = ((q[:, None, :].astype(np.float64) - g[None]) ** 2).sum(-1).min(1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
