"""The lean runtime runs on numpy 1.26 (JetPack 6, Triton's Python stub) and on numpy 2.x.

.ci/run also runs the runtime tests in a second venv with numpy 1.26; these checks pin the
spots where the two APIs differ.
"""

from __future__ import annotations

import numpy as np
import pytest

from spade_edge.runtime.metrics import aupro


def test_aupro_matches_hand_computed_curve() -> None:
    # one 2-pixel region, 2 normal pixels: scores 4,3 (region), 2,1 (normal)
    masks = np.array([[[True, True, False, False]]])
    maps = np.array([[[4.0, 3.0, 2.0, 1.0]]])
    # thresholds 4,3,2,1 -> (fpr, pro) = (0,.5) (0,1) (.5,1) (1,1); area up to fpr 0.3 = 0.3
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(1.0)
    # interleaved: 4 region, 3 normal, 2 region, 1 normal
    maps2 = np.array([[[4.0, 2.0, 3.0, 1.0]]])
    # curve (0,0) (0,.5) (.5,.5) (.5,1) (1,1): area to 0.3 = 0.3*0.5 -> normalised 0.5
    assert aupro(masks, maps2, fpr_limit=0.3) == pytest.approx(0.5)


def test_numpy_matcher_equals_brute_force_float64() -> None:
    """The CPU matcher against plain float64 brute force (no torch: runs in the 1.26 venv)."""
    from tiny_model import tiny_contract

    from spade_edge.runtime.gallery import InMemoryGallery
    from spade_edge.runtime.matchers.numpy_matcher import NumpyMatcher
    from spade_edge.runtime.scoring import combine_levels

    contract = tiny_contract(32)
    rng = np.random.default_rng(7)
    n, k = 9, 3
    shapes = [(lv.height, lv.width, lv.channels) for lv in contract.levels]
    g_levels = [rng.random((n, *s), dtype=np.float32) for s in shapes]
    g_pooled = rng.random((n, contract.pooled_dim), dtype=np.float32)
    gallery = InMemoryGallery.from_features(contract, g_levels, g_pooled)
    q_levels = [rng.random(s, dtype=np.float32) for s in shapes]
    q_pooled = rng.random(contract.pooled_dim, dtype=np.float32)

    got = NumpyMatcher(gallery, k_image=k, k_gallery=k).score_one(q_levels, q_pooled)

    gp = gallery.pooled.astype(np.float64)  # the fp16 values the gallery stores
    d = np.sqrt(((gp - q_pooled.astype(np.float64)) ** 2).sum(axis=1))
    nearest = np.argsort(d, kind="stable")[:k]
    assert list(got.neighbors[:k]) == list(nearest)
    assert got.image_score == pytest.approx(d[nearest].mean(), rel=1e-6)
    level_maps = []
    for q, g in zip(q_levels, gallery.levels, strict=True):
        pool = g[nearest].astype(np.float64).reshape(-1, g.shape[-1])
        qq = q.astype(np.float64).reshape(-1, 1, q.shape[-1])
        dist = np.sqrt(((qq - pool[None]) ** 2).sum(axis=2)).min(axis=1)
        level_maps.append(dist.reshape(q.shape[:2]).astype(np.float32))
    want = combine_levels(level_maps, contract.image_size, 4.0)
    np.testing.assert_allclose(got.anomaly_map, want, rtol=1e-4, atol=1e-5)
