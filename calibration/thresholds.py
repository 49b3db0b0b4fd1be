"""Anomaly thresholds from normal images only (leave-one-out over the gallery itself).

Each gallery image is scored against all the others (its stored features are the query, so no
inference is needed), which gives the distribution of scores of *normal* parts:

* image threshold = the (1 − far) quantile of the leave-one-out image scores: at most a fraction
  ``far`` of normal parts would be flagged;
* pixel threshold = the (1 − far) quantile of the leave-one-out per-image **map maxima**: at most a
  fraction ``far`` of normal parts would show any defect pixel in the binary mask.

Quantiles use the "higher" method (never interpolate below an observed normal score). With N normal
images the smallest meaningful ``far`` is about 1/N.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.errors import CalibrationError
from spade_edge.runtime.matchers.numpy_matcher import NumpyMatcher

DEFAULT_FAR = 0.01
MIN_IMAGES = 10


def leave_one_out_scores(
    gallery: Any,
    k_image: int,
    k_gallery: int,
    sigma: float = 4.0,
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
    return scores, maxima


def thresholds_from_normal(
    scores: np.ndarray, maxima: np.ndarray, far: float = DEFAULT_FAR
) -> dict[str, float]:
    """Quantile thresholds at false-alarm rate ``far`` (see module docstring)."""
    if not 0.0 < far < 1.0:
        raise CalibrationError(f"false-alarm rate must be in (0, 1), got {far}")
    q = 1.0 - far
    return {
        "image": float(np.quantile(scores, q, method="higher")),
        "pixel": float(np.quantile(maxima, q, method="higher")),
    }


def calibrate_gallery(
    gallery_path: str | Path,
    out: str | Path | None = None,
    far: float = DEFAULT_FAR,
    k_image: int | None = None,
    k_gallery: int | None = None,
    sigma: float = 4.0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Compute thresholds and store them in the gallery (a new file, written atomically)."""
    from spade_edge.runtime import __version__
    from spade_edge.runtime.gallery import Gallery, rewrite_gallery

    g = Gallery.open(gallery_path)
    k_i = k_image or g.default_k
    k_g = k_gallery or g.default_k
    scores, maxima = leave_one_out_scores(g, k_i, k_g, sigma, progress)
    th: dict[str, Any] = thresholds_from_normal(scores, maxima, far)
    th.update(
        {
            "far": far,
            "method": "leave-one-out",
            "k_image": k_i,
            "k_gallery": k_g,
            "sigma": sigma,
            "n_normal": int(g.n_images),
            "normal_score_mean": float(scores.mean()),
            "normal_score_max": float(scores.max()),
            "tool_version": __version__,
        }
    )
    rewrite_gallery(g, out or gallery_path, thresholds=th)
    return th
