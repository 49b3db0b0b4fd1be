"""Images people look at: heat-map overlay and binary defect mask, on the original geometry."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from spade_edge.runtime.fileio import write_atomic

# A perceptual "inferno"-like ramp: anchor colours interpolated linearly (no matplotlib needed).
_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


def colormap(x: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB."""
    t = np.clip(x, 0.0, 1.0) * (len(_ANCHORS) - 1)
    i = np.minimum(t.astype(np.int64), len(_ANCHORS) - 2)
    f = (t - i)[..., None]
    return (_ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f).round().astype(np.uint8)


def overlay(rgb: np.ndarray, amap: np.ndarray, vmax: float, alpha: float = 0.7) -> np.ndarray:
    """Blend the heat map over the image; ``vmax`` fixes the scale so images are comparable.

    Opacity grows with the square of the normalised score, so normal regions stay readable and
    anything near ``vmax`` (callers use ~1.2x the pixel threshold) is bright and opaque.
    """
    norm = np.clip(amap / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(amap)
    heat = colormap(norm).astype(np.float32)
    a = alpha * (norm**2)[..., None]
    return (rgb.astype(np.float32) * (1 - a) + heat * a).round().astype(np.uint8)


def save_png(arr: np.ndarray, path: str | Path) -> None:
    """Atomic PNG write: never a half-written file."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    write_atomic(path, buf.getbuffer())
