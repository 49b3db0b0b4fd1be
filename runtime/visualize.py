"""Images people look at: heat-map overlay and binary defect mask, on the original geometry.

Memory is bounded: both are drawn on ``Result.full_map()``'s grid (the original size, or the
original scaled down to ``preprocess.DISPLAY_MAX_PIXELS``), and the overlay is blended in row
bands, so the only full-size arrays are the map, the image and the output (10 bytes a pixel).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from spade_edge.runtime.fileio import write_atomic

if TYPE_CHECKING:
    from spade_edge.runtime.detector import Result

_BAND_PIXELS = 1 << 18  # rows blended at a time

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
    rgb: np.ndarray = (_ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f).round().astype(np.uint8)
    return rgb


def overlay(rgb: np.ndarray, amap: np.ndarray, vmax: float, alpha: float = 0.7) -> np.ndarray:
    """Blend the heat map over the image; ``vmax`` fixes the scale so images are comparable.

    Opacity grows with the square of the normalised score, so normal regions stay readable and
    anything near ``vmax`` (callers use ~1.2x the pixel threshold) is bright and opaque.
    """
    out = np.empty(rgb.shape, dtype=np.uint8)
    step = max(1, _BAND_PIXELS // max(1, amap.shape[1]))
    for y in range(0, amap.shape[0], step):
        m = amap[y : y + step]
        norm = np.clip(m / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(m)
        heat = colormap(norm).astype(np.float32)
        a = alpha * (norm**2)[..., None]
        band = rgb[y : y + step].astype(np.float32) * (1 - a) + heat * a
        out[y : y + step] = band.round()
    return out


def save_png(arr: np.ndarray, path: str | Path) -> None:
    """Atomic PNG write: never a half-written file."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    write_atomic(path, buf.getbuffer())


def save_maps(result: Result, folder: str | Path, stem: str) -> dict[str, str]:
    """Write ``{stem}_overlay.png`` (and ``{stem}_mask.png`` with a pixel threshold) into
    ``folder`` atomically; returns the record fields naming them (``overlay``, ``mask``).

    The overlay's colour scale ends at 1.2 x the pixel threshold (the map's maximum without
    one), so overlays of different parts are comparable.
    """
    folder = Path(folder)
    full = result.full_map()
    thr = result.pixel_threshold
    vmax = 1.2 * thr if thr else float(full.max())
    rgb = result.rgb
    if rgb is None:
        raise ValueError("the result carries no image (rgb) to draw on")
    fields: dict[str, str] = {}
    path = folder / f"{stem}_overlay.png"
    save_png(overlay(rgb, full, vmax), path)
    fields["overlay"] = str(path)
    if thr is not None:
        path = folder / f"{stem}_mask.png"
        save_png(np.where(full >= thr, np.uint8(255), np.uint8(0)), path)
        fields["mask"] = str(path)
    return fields
