"""SPADE post-processing on the CPU: level maps -> one anomaly map in crop geometry.

Bilinear upsampling follows PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)``
(expressed as two small interpolation matrices, so no torch); the blur is
``scipy.ndimage.gaussian_filter`` (mode "reflect", truncate 4), as SPADE's reference code used.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter

#: SPADE's pixel-map smoothing: Gaussian sigma (pixels of the crop) and scipy's truncate.
#: The one definition: matchers (NumPy and CUDA), thresholds and benchmarks import these.
DEFAULT_SIGMA = 4.0
GAUSSIAN_TRUNCATE = 4.0


@lru_cache(maxsize=64)
def interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float32 matrix of 1-D linear interpolation, align_corners=False."""
    scale = n_in / n_out
    dst = np.arange(n_out, dtype=np.float64)
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - lam)
    np.add.at(m, (rows, i1), lam)
    out = m.astype(np.float32)
    out.setflags(write=False)  # shared by lru_cache: callers must not modify it
    return out


def upsample_bilinear(m: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Upsample a 2-D map to ``size`` (int = square) like PyTorch bilinear, align_corners=False."""
    oh, ow = (size, size) if isinstance(size, int) else size
    a = interp_matrix(m.shape[0], oh)
    b = interp_matrix(m.shape[1], ow)
    out: np.ndarray = (a @ m.astype(np.float32, copy=False) @ b.T).astype(np.float32, copy=False)
    return out


def gaussian_blur(m: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing with SPADE's settings (scipy defaults: reflect, truncate 4)."""
    if sigma <= 0:
        return m.astype(np.float32, copy=False)
    out: np.ndarray = gaussian_filter(m, sigma=sigma, mode="reflect", truncate=GAUSSIAN_TRUNCATE)
    return out.astype(np.float32, copy=False)


def combine_levels(level_maps: Sequence[np.ndarray], size: int, sigma: float) -> np.ndarray:
    """Upsample each level's distance map to ``size``, average the levels, blur."""
    acc = np.zeros((size, size), dtype=np.float32)
    for m in level_maps:
        acc += upsample_bilinear(m, size)
    acc /= len(level_maps)
    return gaussian_blur(acc, sigma)
