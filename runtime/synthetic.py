"""Random features and galleries with a model's shapes: for benchmarks and tests only.

One builder serves spade-bench's CPU rows, the torch reference timing, the CUDA matcher
benchmark, the matcher tests and benches/bench_gallery.py. What really differs between them is a
parameter:

- ``features``: ``"uniform"`` draws [0, 1) (timing only: values do not matter); ``"relu"`` draws
  post-ReLU-like values, |N(0, 1)| times a random per-channel scale in [0.2, 2), so a matcher
  test meets non-negative features of varied magnitude as a real backbone produces them.
- ``distinct``: draw only that many images and repeat them lazily to ``n_images``
  (:class:`TiledRows`), so a 1,000-image wrn50 gallery (2.8 GB of fp16) costs no generation time
  or host memory; slices materialise.

The gallery is stored as a packed one is (fp16 features, fp32 squared norms of the fp16 values),
through :meth:`InMemoryGallery.from_features`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias, cast

import numpy as np

from spade_edge.runtime.contract import Contract, Level, resize_for
from spade_edge.runtime.errors import ConfigError
from spade_edge.runtime.gallery import InMemoryGallery
from spade_edge.runtime.matchers.base import GalleryArrays
from spade_edge.runtime.runners.base import Features

FEATURES = ("uniform", "relu")
#: ``rng``: a seed, or a Generator the caller keeps drawing from (tests: gallery, then queries)
Seed: TypeAlias = "int | np.random.Generator"


def shaped_contract(
    levels: Sequence[tuple[str, int, int, int]],
    pooled_dim: int,
    image_size: int,
    backbone: str = "random",
) -> Contract:
    """A contract with these levels ``(name, height, width, channels)``, strides 4, 8, 16, ...;
    random weights (no model behind it)."""
    return Contract(
        backbone=backbone,
        weights="random",
        levels=tuple(
            Level(name=name, stride=4 << i, channels=c, height=h, width=w)
            for i, (name, h, w, c) in enumerate(levels)
        ),
        pooled_dim=int(pooled_dim),
        image_size=int(image_size),
        resize=resize_for(int(image_size)),
    )


def random_features(
    contract: Contract, n: int, rng: Seed = 0, features: str = "uniform"
) -> Features:
    """Host features of ``n`` random images (float32), level by level, then the pooled vector."""
    if features not in FEATURES:
        raise ConfigError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")
    gen = np.random.default_rng(rng)  # a Generator is used as it is
    levels = []
    for lv in contract.levels:
        shape = (n, lv.height, lv.width, lv.channels)
        if features == "uniform":
            levels.append(gen.random(shape, dtype=np.float32))
        else:
            scale = gen.uniform(0.2, 2.0, size=lv.channels).astype(np.float32)
            levels.append(np.abs(gen.standard_normal(shape, dtype=np.float32)) * scale)
    pshape = (n, contract.pooled_dim)
    if features == "uniform":
        pooled = gen.random(pshape, dtype=np.float32)
    else:
        pooled = np.abs(gen.standard_normal(pshape, dtype=np.float32))
    return Features(levels=levels, pooled=pooled, batch=n)


class TiledRows:
    """Array-like of ``n`` rows repeating ``base`` along axis 0; a slice materialises."""

    def __init__(self, base: np.ndarray, n: int) -> None:
        self.base = base
        self.shape: tuple[int, ...] = (int(n), *base.shape[1:])
        self.dtype = base.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, step = sl.indices(self.shape[0])
        out: np.ndarray = self.base[np.arange(start, stop, step) % len(self.base)]
        return out


@dataclass
class TiledGallery:
    """``GalleryArrays`` of ``n_images`` that repeat the images of a smaller gallery."""

    contract: Contract
    n_images: int
    pooled: TiledRows
    pooled_sqnorms: TiledRows
    levels: list[TiledRows]
    level_sqnorms: list[TiledRows]
    path: str = "<random>"

    @classmethod
    def repeat(cls, g: InMemoryGallery, n: int, path: str) -> TiledGallery:
        return cls(
            g.contract,
            n,
            TiledRows(g.pooled, n),
            TiledRows(g.pooled_sqnorms, n),
            [TiledRows(a, n) for a in g.levels],
            [TiledRows(a, n) for a in g.level_sqnorms],
            path,
        )


def random_gallery(
    contract: Contract,
    n_images: int,
    rng: Seed = 0,
    features: str = "uniform",
    distinct: int | None = None,
) -> GalleryArrays:
    """A gallery of ``n_images`` random images with ``contract``'s shapes.

    ``distinct``: draw that many images and repeat them (lazily) to ``n_images``; None draws
    every image (an :class:`InMemoryGallery`).
    """
    d = n_images if distinct is None else max(1, min(n_images, int(distinct)))
    f = random_features(contract, d, rng, features)
    g = InMemoryGallery.from_features(contract, f.levels, f.pooled)
    if d == n_images:
        return g
    # TiledRows index like the fp16 arrays GalleryArrays describes (slices materialise)
    return cast(
        GalleryArrays, TiledGallery.repeat(g, n_images, f"random {contract.backbone} gallery")
    )


__all__ = [
    "FEATURES",
    "TiledGallery",
    "TiledRows",
    "random_features",
    "random_gallery",
    "shaped_contract",
]
