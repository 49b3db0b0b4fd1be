"""The matcher interface: pyramid features of test images in, SPADE scores and maps out.

A matcher owns everything after inference: image-level kNN on the pooled feature, per-level
nearest-position search among the positions of the ``k_gallery`` nearest normal images, sqrt,
bilinear upsampling to the crop size, level mean and Gaussian blur. The NumPy matcher is the
oracle; the CUDA matcher must agree with it within fp16 tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict, runtime_checkable

import numpy as np

from spade_edge.runtime.contract import Contract
from spade_edge.runtime.errors import ConfigError
from spade_edge.runtime.registry import Backend
from spade_edge.runtime.runners.base import Features
from spade_edge.runtime.scoring import DEFAULT_SIGMA as DEFAULT_SIGMA  # re-exported

DEFAULT_K = 5


def check_k(k: int, n: int, name: str) -> int:
    """K must be an integer in 1..N: a clear error otherwise (callers prefix the gallery file)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"{name} must be a positive integer, got {k!r}")
    if k > n:
        raise ConfigError(f"{name}={k} is larger than the gallery ({n} images)")
    return int(k)


class GalleryArrays(Protocol):
    """What a matcher needs from a gallery (the file reader provides it; tests may fake it).

    ``pooled``: float16 [N, Cg]; ``pooled_sqnorms``: float32 [N] (of the fp16 values);
    ``levels[i]``: float16 [N, H, W, C]; ``level_sqnorms[i]``: float32 [N, H, W].
    """

    # read-only members, so a gallery holding lists (or memory maps) satisfies it
    @property
    def contract(self) -> Contract: ...
    @property
    def n_images(self) -> int: ...
    @property
    def pooled(self) -> np.ndarray: ...
    @property
    def pooled_sqnorms(self) -> np.ndarray: ...
    @property
    def levels(self) -> Sequence[np.ndarray]: ...
    @property
    def level_sqnorms(self) -> Sequence[np.ndarray]: ...


@dataclass
class Score:
    """SPADE result for one image, in the crop's geometry (``image_size`` square)."""

    image_score: float
    anomaly_map: np.ndarray  # float32 [S, S]
    neighbors: np.ndarray  # int64 [max(k_image, k_gallery)], nearest first


@runtime_checkable
class Matcher(Protocol):
    """kNN backend. Built once per gallery; ``score`` called per batch."""

    name: str
    k_image: int
    k_gallery: int
    #: may one instance run ``score`` from several threads at once (else callers serialise)
    thread_safe: bool

    def score(self, features: Features) -> list[Score]:
        """Score every image of the batch (host or device features)."""
        ...

    def close(self) -> None:
        """Release resources (device memory for GPU matchers); idempotent; ``score`` afterwards
        raises."""
        ...

    def __enter__(self) -> Any:
        """``with matcher:`` closes it on exit (runtime.registry.Backend)."""
        ...

    def __exit__(self, *exc: object) -> None: ...


class KnnOptions(TypedDict, total=False):
    """The options every matcher takes (:class:`KnnMatcher`); a subclass's constructor adds its
    own keyword-only options and forwards these as ``**knn: Unpack[KnnOptions]``."""

    k_image: int
    k_gallery: int
    sigma: float


class KnnMatcher(Backend):
    """What every matcher shares: the K values checked against the gallery, the blur sigma,
    the crop size, and the Backend lifecycle (``_closed``)."""

    def __init__(
        self,
        gallery: GalleryArrays,
        k_image: int = DEFAULT_K,
        k_gallery: int = DEFAULT_K,
        sigma: float = DEFAULT_SIGMA,
    ) -> None:
        n = int(gallery.n_images)
        self.contract = gallery.contract
        self.n_images = n
        self.k_image = check_k(k_image, n, "k_image")
        self.k_gallery = check_k(k_gallery, n, "k_gallery")
        self.kmax = max(self.k_image, self.k_gallery)
        self.sigma = float(sigma)
        self.size = int(gallery.contract.image_size)
        self._closed = False
