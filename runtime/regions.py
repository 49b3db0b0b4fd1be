"""Defect regions: connected components of the binary defect mask, in original-image pixels.

A reviewer (or a PLC) wants "where", not a 224x224 float map: one box per blob with its area
and peak score. Components are found on the map projected onto the original (EXIF-upright)
image grid, exactly the mask ``spade-run --out`` writes. For very large originals the
projection is made at a reduced scale (at most ``MAX_REGION_PIXELS``) so memory stays bounded;
boxes and areas are then scaled back to original pixels (documented in docs/serve.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from spade_edge.runtime.preprocess import Geometry

#: Largest grid (pixels) the map is projected onto for region labelling.
MAX_REGION_PIXELS = 4_000_000
#: Regions reported per image (largest first).
MAX_REGIONS = 32


@dataclass(frozen=True)
class Region:
    """One connected defect blob: bounding box (original pixels), area (pixels), peak score."""

    x: int
    y: int
    w: int
    h: int
    area: int
    peak: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _projected(amap: np.ndarray, geo: Geometry, scale: float) -> np.ndarray:
    """The crop-geometry map placed in the resized frame and resized to ``scale`` x original."""
    canvas = np.zeros((geo.resized_height, geo.resized_width), dtype=np.float32)
    canvas[geo.top : geo.top + geo.size, geo.left : geo.left + geo.size] = amap
    w = max(1, round(geo.width * scale))
    h = max(1, round(geo.height * scale))
    if (w, h) == (geo.resized_width, geo.resized_height):
        return canvas
    im = Image.fromarray(canvas, mode="F").resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.float32)


def defect_regions(
    amap: np.ndarray,
    geo: Geometry,
    pixel_threshold: float | None,
    max_regions: int = MAX_REGIONS,
    max_pixels: int = MAX_REGION_PIXELS,
) -> list[Region]:
    """Connected components (8-connected) of ``map >= pixel_threshold`` on the original grid,
    largest area first (ties: top-left first), at most ``max_regions``. Empty without a
    threshold."""
    if pixel_threshold is None or max_regions < 1:
        return []
    npx = geo.width * geo.height
    scale = 1.0 if npx <= max_pixels else math.sqrt(max_pixels / npx)
    full = _projected(np.asarray(amap, dtype=np.float32), geo, scale)
    mask = full >= pixel_threshold
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    areas = ndimage.sum_labels(mask, labels, idx)
    peaks = ndimage.maximum(full, labels, idx)
    boxes = ndimage.find_objects(labels)
    sx = geo.width / full.shape[1]
    sy = geo.height / full.shape[0]
    order = sorted(range(n), key=lambda i: (-areas[i], boxes[i][0].start, boxes[i][1].start))
    out = []
    for i in order[:max_regions]:
        ys, xs = boxes[i]
        x0, x1 = math.floor(xs.start * sx), math.ceil(xs.stop * sx)
        y0, y1 = math.floor(ys.start * sy), math.ceil(ys.stop * sy)
        out.append(
            Region(
                x=x0,
                y=y0,
                w=min(x1, geo.width) - x0,
                h=min(y1, geo.height) - y0,
                area=round(float(areas[i]) * sx * sy),
                peak=round(float(peaks[i]), 6),
            )
        )
    return out


__all__ = ["MAX_REGIONS", "MAX_REGION_PIXELS", "Region", "defect_regions"]
