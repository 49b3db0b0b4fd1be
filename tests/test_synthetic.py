"""runtime.synthetic: the one random-gallery builder of the benchmarks and the matcher tests."""

from __future__ import annotations

import numpy as np
import pytest

from spade_edge.runtime.errors import ConfigError
from spade_edge.runtime.gallery import InMemoryGallery, sqnorms_fp16
from spade_edge.runtime.synthetic import (
    TiledGallery,
    random_features,
    random_gallery,
    shaped_contract,
)

SHAPES = [("a", 6, 5, 12), ("b", 3, 3, 20)]


def test_uniform_draws_levels_then_pooled_from_the_seed() -> None:
    """spade-bench's gallery: [0, 1) float32 drawn level by level, then pooled, then fp16."""
    c = shaped_contract(SHAPES, 16, 32)
    g = random_gallery(c, 4, rng=7)
    rng = np.random.default_rng(7)
    want = [rng.random((4, h, w, ch), dtype=np.float32) for _, h, w, ch in SHAPES]
    pooled = rng.random((4, 16), dtype=np.float32)
    assert isinstance(g, InMemoryGallery) and g.n_images == 4
    for got, w in zip(g.levels, want, strict=True):
        np.testing.assert_array_equal(got, w.astype(np.float16))
    np.testing.assert_array_equal(g.pooled, pooled.astype(np.float16))
    np.testing.assert_array_equal(g.pooled_sqnorms, sqnorms_fp16(g.pooled))


def test_relu_features_are_non_negative_with_a_scale_per_channel() -> None:
    c = shaped_contract(SHAPES, 16, 32)
    f = random_features(c, 50, rng=np.random.default_rng(1), features="relu")
    for a in [*f.levels, f.pooled]:
        assert a.dtype == np.float32 and (a >= 0).all()
    spread = f.levels[1].reshape(-1, 20).mean(axis=0)
    assert spread.max() > 2 * spread.min()  # channel scales in [0.2, 2)


def test_a_caller_generator_keeps_drawing() -> None:
    """Tests draw the gallery, then queries, from one Generator: no restart at the seed."""
    c = shaped_contract(SHAPES, 16, 32)
    rng = np.random.default_rng(3)
    a = random_features(c, 2, rng, "relu")
    b = random_features(c, 2, rng, "relu")
    assert not np.array_equal(a.pooled, b.pooled)


def test_distinct_images_tile_lazily() -> None:
    """The CUDA benchmark's huge-N gallery: few images repeated; slices are the real rows."""
    c = shaped_contract(SHAPES, 16, 32)
    g = random_gallery(c, 10, rng=2, features="relu", distinct=3)
    assert isinstance(g, TiledGallery) and g.n_images == 10
    assert g.levels[0].shape == (10, 6, 5, 12)
    small = random_gallery(c, 3, rng=2, features="relu")
    rows = np.arange(10) % 3
    np.testing.assert_array_equal(g.levels[1][0:10], np.asarray(small.levels[1])[rows])
    np.testing.assert_array_equal(
        g.pooled_sqnorms[4:9], np.asarray(small.pooled_sqnorms)[rows[4:9]]
    )
    np.testing.assert_array_equal(
        g.level_sqnorms[0][::4], np.asarray(small.level_sqnorms[0])[rows[::4]]
    )


def test_unknown_distribution_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="features must be one of uniform, relu"):
        random_gallery(shaped_contract(SHAPES, 16, 32), 2, features="normal")
