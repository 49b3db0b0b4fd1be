"""Anomaly thresholds from normal images only (leave-one-out over the gallery itself).

Each gallery image is scored against all the others (its stored features are the query, so no
inference is needed), which gives the distribution of scores of *normal* parts:

* image threshold = the (1 − far) quantile of the leave-one-out image scores: at most a fraction
  ``far`` of normal parts would be flagged;
* pixel threshold = the (1 − far) quantile of the leave-one-out per-image **map maxima**: at most a
  fraction ``far`` of normal parts would show any defect pixel in the binary mask.

Quantiles use the "higher" method (never interpolate below an observed normal score). With N normal
images the smallest meaningful ``far`` is about 1/N.

Lives in the runtime because the packer (thresholds are part of a complete gallery, written in the
same atomic write as the features), the Detector (are the stored thresholds still this gallery's?)
and the service all need it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from spade_edge.runtime import __version__
from spade_edge.runtime.errors import CalibrationError
from spade_edge.runtime.gallery import Gallery, rewrite_gallery
from spade_edge.runtime.matchers.base import DEFAULT_SIGMA

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+
    from typing_extensions import Unpack
from spade_edge.runtime.matchers.numpy_matcher import NumpyMatcher

DEFAULT_FAR = 0.01
MIN_IMAGES = 10


def leave_one_out_scores(
    gallery: Any,
    k_image: int,
    k_gallery: int,
    sigma: float = DEFAULT_SIGMA,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores and map maxima of every gallery image against the rest."""
    n = gallery.n_images
    if n < MIN_IMAGES:
        raise CalibrationError(
            f"{gallery.path}: {n} normal images; leave-one-out thresholds need >= {MIN_IMAGES}"
        )
    k = max(k_image, k_gallery)
    if k > n - 1:
        raise CalibrationError(
            f"{gallery.path}: K={k} needs at least {k + 1} images for leave-one-out, "
            f"the gallery has {n}"
        )
    m = NumpyMatcher(gallery, k_image=k_image, k_gallery=k_gallery, sigma=sigma)
    scores = np.empty(n, dtype=np.float64)
    maxima = np.empty(n, dtype=np.float64)
    for i in range(n):
        levels = [np.asarray(lv[i], dtype=np.float32) for lv in gallery.levels]
        pooled = np.asarray(gallery.pooled[i], dtype=np.float32)
        s = m.score_one(levels, pooled, exclude=i)
        scores[i] = s.image_score
        maxima[i] = float(s.anomaly_map.max())
        if progress:
            progress(1)
    if not (np.isfinite(scores).all() and np.isfinite(maxima).all()):
        raise CalibrationError(
            f"{gallery.path}: leave-one-out scores are not finite (corrupt features?); "
            "check the gallery with spade-inspect --verify"
        )
    return scores, maxima


def _checked_far(far: float) -> float:
    if not 0.0 < far < 1.0:  # NaN fails this too
        raise CalibrationError(f"false-alarm rate must be in (0, 1), got {far}")
    return far


def thresholds_from_normal(
    scores: np.ndarray, maxima: np.ndarray, far: float = DEFAULT_FAR
) -> dict[str, float]:
    """Quantile thresholds at false-alarm rate ``far`` (see module docstring)."""
    q = 1.0 - _checked_far(far)
    return {
        "image": float(np.quantile(scores, q, method="higher")),
        "pixel": float(np.quantile(maxima, q, method="higher")),
    }


def compute_thresholds(
    gallery: Any,
    far: float = DEFAULT_FAR,
    k_image: int | None = None,
    k_gallery: int | None = None,
    sigma: float = DEFAULT_SIGMA,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The ``thresholds`` record of a gallery (open ``Gallery`` or ``InMemoryGallery``; K
    defaults to its ``default_k``): quantiles plus how they were obtained."""
    _checked_far(far)  # before the O(N²) work
    k_i = k_image or gallery.default_k
    k_g = k_gallery or gallery.default_k
    scores, maxima = leave_one_out_scores(gallery, k_i, k_g, sigma, progress)
    th: dict[str, Any] = thresholds_from_normal(scores, maxima, far)
    th.update(
        {
            "far": far,
            "method": "leave-one-out",
            "k_image": k_i,
            "k_gallery": k_g,
            "sigma": sigma,
            "n_normal": int(gallery.n_images),
            "normal_score_mean": float(scores.mean()),
            "normal_score_max": float(scores.max()),
            "tool_version": __version__,
        }
    )
    return th


class ThresholdOptions(TypedDict, total=False):
    """:func:`compute_thresholds`' options, forwarded unchanged by :func:`calibrate_gallery`."""

    far: float
    k_image: int | None
    k_gallery: int | None
    sigma: float
    progress: Callable[[int], None] | None


def calibrate_gallery(
    gallery_path: str | Path,
    out: str | Path | None = None,
    **options: Unpack[ThresholdOptions],
) -> dict[str, Any]:
    """Compute thresholds (:func:`compute_thresholds`' options) and store them in the gallery
    (a new file, written atomically).

    The blobs are copied into the new file, so they are verified first (a corrupt gallery must
    never come out with fresh, valid checksums).
    """
    with Gallery.open(gallery_path, verify=True) as g:
        th = compute_thresholds(g, **options)
        rewrite_gallery(g, out or gallery_path, thresholds=th)
    return th


def thresholds_problem(gallery: Any) -> str | None:
    """Why a gallery's stored thresholds do not describe it (None when they do, or it has none).

    Thresholds are quantiles over the gallery's own normal images; after images were added
    (``n_normal`` ≠ image count) they belong to another gallery.
    """
    th = getattr(gallery, "thresholds", None)
    if not th:
        return None
    n = th.get("n_normal")
    if n is not None and n != gallery.n_images:
        return (
            f"stored thresholds were calibrated on {n} normal images but the gallery has "
            f"{gallery.n_images}; verdicts use them anyway (recalibrate with spade-threshold)"
        )
    return None


__all__ = [
    "DEFAULT_FAR",
    "MIN_IMAGES",
    "ThresholdOptions",
    "calibrate_gallery",
    "compute_thresholds",
    "leave_one_out_scores",
    "thresholds_from_normal",
    "thresholds_problem",
]
