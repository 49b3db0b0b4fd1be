"""Defect regions (runtime/regions.py): boxes, areas and peaks on the original image grid."""

from __future__ import annotations

import numpy as np

from spade_edge.runtime.detector import project_to_original
from spade_edge.runtime.preprocess import Geometry
from spade_edge.runtime.regions import defect_regions


def _geo(w: int, h: int, s: int = 8) -> Geometry:
    # no resize (resized == original), crop s x s at the centre
    return Geometry(w, h, w, h, (w - s) // 2, (h - s) // 2, s)


def test_components_largest_first_with_boxes_areas_peaks() -> None:
    amap = np.zeros((8, 8), np.float32)
    amap[0:2, 0:2] = 5.0  # 4 px
    amap[4:7, 3:7] = 3.0  # 12 px
    amap[5, 5] = 9.0
    amap[7, 0] = 0.99  # below threshold
    geo = _geo(12, 10)  # crop at left 2, top 1
    regs = defect_regions(amap, geo, pixel_threshold=1.0)
    assert [(r.x, r.y, r.w, r.h, r.area) for r in regs] == [(5, 5, 4, 3, 12), (2, 1, 2, 2, 4)]
    assert [r.peak for r in regs] == [9.0, 5.0]
    # the same mask spade-run writes: every region pixel is >= threshold on the full map
    full = project_to_original(amap, geo)
    assert int((full >= 1.0).sum()) == sum(r.area for r in regs)


def test_diagonal_pixels_join_and_limits() -> None:
    amap = np.zeros((8, 8), np.float32)
    amap[1, 1] = amap[2, 2] = 2.0  # 8-connected: one region
    geo = _geo(8, 8)
    regs = defect_regions(amap, geo, 1.0)
    assert len(regs) == 1 and regs[0].area == 2
    assert defect_regions(amap, geo, None) == []
    grid = np.zeros((8, 8), np.float32)
    grid[::2, ::2] = 2.0  # 16 separate pixels
    assert len(defect_regions(grid, geo, 1.0, max_regions=5)) == 5


def test_huge_original_is_labelled_on_a_bounded_grid() -> None:
    # 224 crop of a 6000x4000 original (resized 384x256): labelling at full size would need a
    # 96 MB float map; the bounded grid gives the same box within one grid cell
    geo = Geometry(6000, 4000, 384, 256, 80, 16, 224)
    amap = np.zeros((224, 224), np.float32)
    amap[100:120, 50:90] = 4.0
    regs = defect_regions(amap, geo, 1.0, max_pixels=200_000)
    assert len(regs) == 1
    r = regs[0]
    sx = 6000 / 384  # original pixels per resized pixel
    cell = 6000 / round(6000 * (200_000 / 24e6) ** 0.5) + sx  # grid cell + bilinear spread
    assert abs(r.x - (80 + 50) * sx) <= cell and abs(r.w - 40 * sx) <= 2 * cell
    assert abs(r.y - (16 + 100) * sx) <= cell and abs(r.h - 20 * sx) <= 2 * cell
    assert r.peak <= 4.0 + 1e-6
