"""NumPy matcher: the CPU backend and the oracle every GPU matcher is tested against.

Distances use the expanded form ‖q‖² + ‖g‖² − 2 q·g in fp32 over the fp16 gallery, with the
gallery's stored squared norms folded into the GEMM: ``[−2q, 1] · [g, ‖g‖²]ᵀ`` gives
``‖g‖² − 2 q·g`` in one BLAS call, so the only pass over the distance tile is the row argmin.
The winner's distance is then recomputed exactly from the difference vector (as faiss refines).
Work is tiled over gallery images and query rows so memory stays bounded at any K (the full
N×M matrix is never formed). Stateless per call, hence thread-safe.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from spade_edge.runtime.errors import InputError
from spade_edge.runtime.matchers.base import GalleryArrays, KnnMatcher, KnnOptions, Score
from spade_edge.runtime.runners.base import Features
from spade_edge.runtime.scoring import combine_levels

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+
    from typing_extensions import Unpack

#: Distance tiles (float32 elements). Wide features (C >= 128) are GEMM-bound and want big
#: tiles; narrow ones (Lite0, C = 24) are memory-bound and want cache-sized tiles. Re-check
#: both with `spade bench` (per-level pixel kNN rows) on a new CPU.
TILE_ELEMENTS = 16 * 1024 * 1024
NARROW_TILE_ELEMENTS = 2 * 1024 * 1024
NARROW_CHANNELS = 128
EPS32 = float(np.finfo(np.float32).eps)
#: Rows whose nearest squared distance is below this many error bounds are re-ranked exactly
#: (see min_sq_distances); scale-free, so it means the same for every backbone.
REFINE_FACTOR = 256.0


_local = threading.local()


def _scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A per-thread float32 buffer reused across calls (grow-only, bounded by TILE_ELEMENTS):
    no page-faulting allocation of fresh 16 MiB tiles on every image, and still thread-safe."""
    bufs = _local.__dict__.setdefault("bufs", {})
    n = int(np.prod(shape))
    buf = bufs.get(name)
    if buf is None or buf.size < n:
        buf = bufs[name] = np.empty(n, dtype=np.float32)
    out: np.ndarray = buf[:n].reshape(shape)
    return out


def nearest_images(
    q: np.ndarray, pooled: np.ndarray, pooled_sq: np.ndarray, k: int, exclude: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (nearest first, ties -> lower index) and plain-L2 distances of the k nearest.

    Computed in float64 (the pooled matrix is small), so image scores carry no cancellation error.
    """
    q = q.astype(np.float64)
    d2 = pooled_sq - 2.0 * (pooled @ q) + float(q @ q)
    np.maximum(d2, 0.0, out=d2)
    if exclude is not None:
        d2[exclude] = np.inf
    if k < len(d2):
        part = np.argpartition(d2, k - 1)[:k]
        kth = d2[part].max()
        cand = np.flatnonzero(d2 <= kth)  # all ties at the boundary, so lower index wins
    else:
        cand = np.arange(len(d2))
    order = cand[np.lexsort((cand, d2[cand]))][:k]
    return order.astype(np.int64), np.sqrt(d2[order])


def min_sq_distances(
    q: np.ndarray, level: np.ndarray, level_sq: np.ndarray, images: np.ndarray
) -> np.ndarray:
    """For each query row of ``q`` [P, C], min over all positions of ``images`` of ‖q − g‖².

    The fp32 GEMM (expanded form) finds the nearest position; its distance is then recomputed
    from the difference vector, so no cancellation error survives. Where the nearest distance is
    tiny (near-identical background positions) the expanded form cannot rank the candidates, so
    every candidate within its error bound is recomputed exactly (a few hundred rows at most).
    """
    n_pos = int(np.prod(level.shape[1:-1]))
    c = level.shape[-1]
    p = q.shape[0]
    q = np.ascontiguousarray(q, dtype=np.float32)
    qa = np.empty((p, c + 1), dtype=np.float32)
    np.multiply(q, -2.0, out=qa[:, :c])  # [-2q, 1] · [g, ‖g‖²] = ‖g‖² − 2 q·g
    qa[:, c] = 1.0
    q_sq = np.einsum("ij,ij->i", q, q, dtype=np.float32)
    g_max = float(np.max(level_sq[images]))
    # error bound of the fp32 expanded form (generous: 4 eps of the magnitudes involved)
    delta = 4 * EPS32 * (q_sq + g_max + 2 * np.sqrt(q_sq * g_max))
    best = np.full(p, np.inf, dtype=np.float32)
    best_img = np.zeros(p, dtype=np.int64)
    best_pos = np.zeros(p, dtype=np.int64)
    refined = np.full(p, np.inf, dtype=np.float32)
    budget = NARROW_TILE_ELEMENTS if c < NARROW_CHANNELS else TILE_ELEMENTS
    imgs_per_chunk = max(1, budget // (n_pos * (c + 1)))
    for s in range(0, len(images), imgs_per_chunk):
        idx = images[s : s + imgs_per_chunk]
        m = len(idx) * n_pos
        ga = _scratch("gallery", (m, c + 1))
        for j, i in enumerate(idx):  # fp16 -> fp32 straight into the GEMM operand
            ga[j * n_pos : (j + 1) * n_pos, :c] = level[i].reshape(n_pos, c)
            ga[j * n_pos : (j + 1) * n_pos, c] = level_sq[i].reshape(n_pos)
        rows = max(1, min(p, budget // m))
        for r in range(0, p, rows):
            q_rows = qa[r : r + rows]
            tile = np.matmul(q_rows, ga.T, out=_scratch("tile", (len(q_rows), m)))
            arg = tile.argmin(axis=1)
            val = tile[np.arange(len(arg)), arg]
            better = val < best[r : r + rows]
            sel = np.flatnonzero(better) + r
            best[sel] = val[better]
            best_img[sel] = idx[arg[better] // n_pos]
            best_pos[sel] = arg[better] % n_pos
            small = np.flatnonzero(val + q_sq[r : r + rows] < REFINE_FACTOR * delta[r : r + rows])
            if small.size:
                thr = val[small] + 2 * delta[r + small]
                ri, ci = np.nonzero(tile[small] <= thr[:, None])
                diff = q[r + small[ri]] - ga[ci, :c]
                d = np.einsum("ij,ij->i", diff, diff, dtype=np.float32)
                starts = np.flatnonzero(np.r_[True, ri[1:] != ri[:-1]])
                rows_hit = r + small[ri[starts]]
                refined[rows_hit] = np.minimum(refined[rows_hit], np.minimum.reduceat(d, starts))
    nearest = level.reshape(level.shape[0], n_pos, c)[best_img, best_pos].astype(np.float32)
    diff = q - nearest
    out: np.ndarray = np.minimum(np.einsum("ij,ij->i", diff, diff, dtype=np.float32), refined)
    return out


class NumpyMatcher(KnnMatcher):
    """SPADE kNN scoring on the CPU."""

    name = "numpy"
    thread_safe = True

    def __init__(self, gallery: GalleryArrays, **knn: Unpack[KnnOptions]) -> None:
        super().__init__(gallery, **knn)
        self.gallery = gallery
        # The pooled matrix is small (N x Cg): keep a float64 copy for the image-level GEMV.
        self._pooled = np.ascontiguousarray(gallery.pooled, dtype=np.float64)
        self._pooled_sq = (self._pooled**2).sum(axis=1)

    def _check(self, f: Features) -> None:
        c = self.gallery.contract
        if len(f.levels) != len(c.levels):
            raise InputError(f"features have {len(f.levels)} levels, the gallery {len(c.levels)}")
        for lv, arr in zip(c.levels, f.levels, strict=True):
            if tuple(arr.shape[1:]) != (lv.height, lv.width, lv.channels):
                raise InputError(
                    f"level {lv.name}: features {tuple(arr.shape[1:])} do not match the gallery "
                    f"({lv.height}, {lv.width}, {lv.channels})"
                )

    def score_one(
        self, levels: list[np.ndarray], pooled: np.ndarray, exclude: int | None = None
    ) -> Score:
        """Score one image given its per-level [H, W, C] features and pooled vector.

        ``exclude`` drops one gallery image (leave-one-out threshold calibration).
        """
        k = max(self.k_image, self.k_gallery)
        idx, dist = nearest_images(pooled, self._pooled, self._pooled_sq, k, exclude)
        image_score = float(dist[: self.k_image].mean())
        pix_idx = np.sort(idx[: self.k_gallery])
        maps = []
        for lv, q, g, gsq in zip(
            self.gallery.contract.levels,
            levels,
            self.gallery.levels,
            self.gallery.level_sqnorms,
            strict=True,
        ):
            qf = np.ascontiguousarray(q, dtype=np.float32).reshape(-1, lv.channels)
            d2 = min_sq_distances(qf, g, gsq, pix_idx)
            maps.append(np.sqrt(d2).reshape(lv.height, lv.width))
        amap = combine_levels(maps, self.size, self.sigma)
        return Score(image_score, amap, idx)

    def score(self, features: Features) -> list[Score]:
        if self._closed:
            raise InputError(f"{self.name} matcher: score() after close()")
        f = features.to_host()
        self._check(f)
        return [self.score_one([lv[i] for lv in f.levels], f.pooled[i]) for i in range(f.batch)]

    def close(self) -> None:
        self._closed = True
