"""Matcher checks shared by the matcher tests and scripts/cuda_sanitize_case.py: random galleries
and features in the tests' shapes (runtime.synthetic, post-ReLU-like), and the comparison of a
matcher's results with the NumPy oracle's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from spade_edge.runtime import synthetic
from spade_edge.runtime.contract import Contract
from spade_edge.runtime.gallery import InMemoryGallery
from spade_edge.runtime.runners.base import Features


def make_contract(shapes: list[tuple[int, int, int]], pooled_dim: int, size: int) -> Contract:
    return synthetic.shaped_contract(
        [(f"l{i}", *s) for i, s in enumerate(shapes)], pooled_dim, size, "test"
    )


def random_features(rng: np.random.Generator, contract: Contract, n: int) -> Features:
    """Post-ReLU-like features (non-negative, varied scale per channel)."""
    return synthetic.random_features(contract, n, rng, "relu")


def make_gallery(
    rng: np.random.Generator,
    shapes: list[tuple[int, int, int]],
    pooled_dim: int,
    n: int,
    size: int = 32,
) -> InMemoryGallery:
    g = synthetic.random_gallery(make_contract(shapes, pooled_dim, size), n, rng, "relu")
    assert isinstance(g, InMemoryGallery)
    return g


def assert_matches(got: Sequence[Any], want: Sequence[Any], rtol: float = 2e-3) -> None:
    """Same neighbours exactly; image score to fp64 rounding; maps within fp16 tolerance."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.neighbors, w.neighbors)
        assert g.image_score == pytest.approx(w.image_score, rel=1e-5)
        assert g.anomaly_map.shape == w.anomaly_map.shape
        assert g.anomaly_map.dtype == np.float32
        scale = float(np.abs(w.anomaly_map).max())
        np.testing.assert_allclose(g.anomaly_map, w.anomaly_map, rtol=rtol, atol=rtol * scale)
