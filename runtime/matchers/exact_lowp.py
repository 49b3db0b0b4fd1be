"""Exact low-precision matcher: int8 or bf16 GEMM for candidates, fp32 re-rank for the answer.

The pixel kNN (every query position against every position of the K nearest normal images) is a
GEMM; int8 and bf16 matrix units (VNNI, AVX512-BF16, AMX) run it several times faster than fp32.
Their rounding may reorder near neighbours, so the low-precision tile only *proposes*: every
gallery position whose approximate distance is within the derived error bound of the row's
approximate minimum is recomputed exactly (fp32 difference vector, the formula the NumPy oracle
uses for its winner), and the minimum of those is returned. No position outside the bound can be
nearer, so the nearest distance equals the fp32 oracle's (see ``error_bound`` for the derivation;
nothing in it is tuned).

Engines: int8 runs ONNX Runtime's ``MatMulIntegerToFloat`` (u8 queries × s8 gallery, exact int32
accumulation, per-position scales folded into the output) with ``ReduceMin`` in the same graph;
bf16 runs an OpenVINO MatMul + ReduceMin compiled with ``INFERENCE_PRECISION_HINT=bf16`` (the
operands are rounded to bf16 here first, so the rounding error is known exactly). The image kNN
(N × Cg, tiny) stays float64 NumPy. Measurements and the choice of libraries: docs/cpu.md.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spade_edge.runtime.errors import BackendUnavailableError, ConfigError
from spade_edge.runtime.matchers.base import GalleryArrays, KnnOptions, Score
from spade_edge.runtime.matchers.numpy_matcher import (
    NARROW_CHANNELS,
    NumpyMatcher,
    min_sq_distances,
    nearest_images,
)
from spade_edge.runtime.scoring import combine_levels

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+
    from typing_extensions import Unpack

EPS32 = float(np.finfo(np.float32).eps)  # 2u for fp32 round-to-nearest
BF16_UNIT = 2.0**-8  # unit roundoff of bf16 (8-bit significand, round to nearest)
#: int8 gallery codes stay in [-64, 63]: with u8 queries a pair of products fits int16, so the
#: AVX2 kernel (vpmaddubsw, which saturates at 16 bits) is exact too; VNNI/AMX are exact anyway.
G_LO, G_HI = -64, 63
#: MatMulIntegerToFloat (com.microsoft) + ReduceMin over the rows, all dimensions symbolic.
#: Shipped prebuilt so the lean install needs no onnx package; tests/test_exact_lowp.py rebuilds
#: it with onnx (``int8_graph_bytes``) and checks the shipped bytes are identical.
INT8_GRAPH = Path(__file__).with_name("lowp_int8.onnx")
#: approximate-distance tile budget (float32 elements) per engine call
TILE_ELEMENTS = 16 * 1024 * 1024


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bf16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    out: np.ndarray = r.view(np.float32)
    return out


@dataclass
class CandidateStats:
    """How many gallery positions the exact re-rank needed per query position."""

    queries: int = 0
    total: int = 0
    max: int = 0

    def add(self, counts: np.ndarray) -> None:
        if counts.size:
            self.queries += int(counts.size)
            self.total += int(counts.sum())
            self.max = max(self.max, int(counts.max()))

    @property
    def mean(self) -> float:
        return self.total / self.queries if self.queries else 0.0

    def summary(self) -> dict[str, float | int]:
        return {"queries": self.queries, "mean": round(self.mean, 3), "max": self.max}


@dataclass
class _Block:
    """Low-precision form of one gallery image at one level (built on first use, cached)."""

    values: np.ndarray  # engine operand, [HW, C] (int8 codes or bf16-exact float32)
    scale: np.ndarray  # int8: float32 [HW] (per position); bf16: empty
    zero: np.ndarray  # int8: int8 [HW]; bf16: empty
    sqnorm: np.ndarray  # float32 [HW], ‖g‖² from float64
    norm_max: float  # max ‖g‖
    resid_max: float  # max ‖g − g̃‖ (exact, float64)

    @classmethod
    def rounded(
        cls, g64: np.ndarray, approx: np.ndarray, values: np.ndarray, scale: Any, zero: Any
    ) -> _Block:
        """The engine operand ``values`` (read back exactly as ``approx``) of the gallery rows
        ``g64`` (float64), with the norms and rounding residual the error bound needs."""
        sq = (g64**2).sum(axis=1)
        return cls(
            values=values,
            scale=scale,
            zero=zero,
            sqnorm=sq.astype(np.float32),
            norm_max=float(np.sqrt(sq.max())),
            resid_max=float(np.sqrt(((g64 - approx) ** 2).sum(axis=1).max())),
        )


@dataclass
class _Query:
    values: np.ndarray
    scale: float  # int8 only (bf16: 1.0, unused)
    zero: int
    norm: np.ndarray  # float64 [P] ‖q‖
    resid: np.ndarray  # float64 [P] ‖q − q̃‖
    sqnorm: np.ndarray  # float32 [P] ‖q‖² (fp32, as in the oracle)
    approx_norm: np.ndarray = field(default_factory=lambda: np.zeros(0))  # ‖q̃‖

    @classmethod
    def rounded(
        cls, q: np.ndarray, approx: np.ndarray, values: np.ndarray, scale: float, zero: int
    ) -> _Query:
        """The engine operand ``values`` (read back exactly as ``approx``, float64) of the query
        rows ``q``, with the norms and rounding residuals the error bound needs."""
        q64 = q.astype(np.float64)
        return cls(
            values=values,
            scale=scale,
            zero=zero,
            norm=np.sqrt((q64**2).sum(axis=1)),
            resid=np.sqrt(((q64 - approx) ** 2).sum(axis=1)),
            sqnorm=np.einsum("ij,ij->i", q, q, dtype=np.float32),
            approx_norm=np.sqrt((approx**2).sum(axis=1)),
        )


class _Int8Engine:
    """u8 × s8 → float GEMM with per-position gallery scales (ONNX Runtime contrib op)."""

    name = "onnxruntime-int8"
    output_unit = 0.0  # outputs are fp32

    def __init__(self, channels: int, threads: int | None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # shapes change with K and the tile: ORT's arena would keep every size it ever saw
        # (measured: 11 GB RSS over a K=5/K=50 run); plain allocations are returned
        so.enable_cpu_mem_arena = False
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            INT8_GRAPH.read_bytes(), so, providers=["CPUExecutionProvider"]
        )

    @staticmethod
    def block(g: np.ndarray) -> _Block:
        g64 = g.astype(np.float64)
        lo = np.minimum(g64.min(axis=1), 0.0)
        hi = np.maximum(g64.max(axis=1), 0.0)
        scale = ((hi - lo) / (G_HI - G_LO)).astype(np.float32)
        scale[scale == 0] = 1.0
        s64 = scale.astype(np.float64)[:, None]
        zero = np.clip(G_LO - np.round(lo / scale), G_LO, G_HI).astype(np.int8)
        codes = np.clip(np.round(g64 / s64) + zero[:, None], G_LO, G_HI).astype(np.int8)
        approx = s64 * (codes.astype(np.float64) - zero[:, None])
        values = np.ascontiguousarray(codes.T)  # [C, HW]: the GEMM's B operand
        return _Block.rounded(g64, approx, values, scale, zero)

    @staticmethod
    def query(q: np.ndarray) -> _Query:
        q64 = q.astype(np.float64)
        lo, hi = min(float(q64.min()), 0.0), max(float(q64.max()), 0.0)
        scale = np.float32((hi - lo) / 255.0) if hi > lo else np.float32(1.0)
        zero = int(np.clip(np.round(-lo / float(scale)), 0, 255))
        codes = np.clip(np.round(q64 / float(scale)) + zero, 0, 255).astype(np.uint8)
        approx = float(scale) * (codes.astype(np.float64) - zero)
        return _Query.rounded(q, approx, codes, float(scale), zero)

    @staticmethod
    def operands(blocks: list[_Block]) -> dict[str, np.ndarray]:
        """The gallery side of the GEMM for these images (built once per level and query)."""
        return {
            "B": np.concatenate([bl.values for bl in blocks], axis=1),
            "b_scale": np.concatenate([bl.scale for bl in blocks]) * np.float32(-2.0),  # exact
            "b_zero": np.concatenate([bl.zero for bl in blocks]),
            "bias": np.concatenate([bl.sqnorm for bl in blocks]),
        }

    def run(
        self, qr: _Query, rows: slice, ops: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate ‖g‖² − 2 q̃·g̃ for the rows × all gallery positions, and row minima."""
        feed = {
            "A": qr.values[rows],
            "a_scale": np.array(qr.scale, dtype=np.float32),
            "a_zero": np.array(qr.zero, dtype=np.uint8),
            **ops,
        }
        y, m = self.session.run(["Y", "M"], feed)
        return np.asarray(y), np.asarray(m)

    def close(self) -> None:
        self.session = None


class _Bf16Engine:
    """bf16 GEMM + row minimum compiled by OpenVINO (AMX / AVX512-BF16 kernels where present)."""

    name = "openvino-bf16"
    output_unit = BF16_UNIT  # the hint may keep the output (and the min) in bf16 as well

    def __init__(self, channels: int, threads: int | None) -> None:
        try:
            import openvino as ov
            import openvino.opset13 as ops
        except ImportError:
            raise BackendUnavailableError(
                "the bf16 matcher needs OpenVINO: pip install 'spade-edge[openvino]'"
            ) from None
        q = ops.parameter([-1, channels], ov.Type.f32, name="q")
        g = ops.parameter([channels, -1], ov.Type.f32, name="g")
        bias = ops.parameter([-1], ov.Type.f32, name="bias")
        y = ops.add(ops.matmul(q, g, False, False), bias)  # q already carries the factor -2
        m = ops.reduce_min(y, ops.constant(np.array([1], dtype=np.int64)), False)
        cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16"}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(ov.Model([y, m], [q, g, bias]), "CPU", cfg)
        self.request = self.compiled.create_infer_request()

    @staticmethod
    def block(g: np.ndarray) -> _Block:
        gr = bf16_round(g)
        return _Block.rounded(
            g.astype(np.float64),
            gr,
            np.ascontiguousarray(gr.T),
            np.empty(0, dtype=np.float32),
            np.empty(0, dtype=np.int8),
        )

    @staticmethod
    def query(q: np.ndarray) -> _Query:
        qr = bf16_round(q)
        # values: exact, scaling by 2 keeps bf16 values
        return _Query.rounded(q, qr.astype(np.float64), np.ascontiguousarray(-2.0 * qr), 1.0, 0)

    @staticmethod
    def operands(blocks: list[_Block]) -> dict[str, np.ndarray]:
        return {
            "g": np.concatenate([bl.values for bl in blocks], axis=1),
            "bias": np.concatenate([bl.sqnorm for bl in blocks]),
        }

    def run(
        self, qr: _Query, rows: slice, ops: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        res = self.request.infer({0: qr.values[rows], 1: ops["g"], 2: ops["bias"]})
        return np.asarray(res[0], dtype=np.float32), np.asarray(res[1], dtype=np.float32)

    def close(self) -> None:
        self.request = None
        self.compiled = None


ENGINES: dict[str, Callable[[int, int | None], Any]] = {"int8": _Int8Engine, "bf16": _Bf16Engine}


def error_bound(
    qr: _Query, norm_max: float, resid_max: float, channels: int, output_unit: float
) -> np.ndarray:
    """Per query row: max |approx − exact| of ‖q‖² + ‖g‖² − 2 q·g over the gallery positions.

    With q̃ = q − e_q and g̃ = g − e_g (the low-precision values, residuals known exactly):
    q·g − q̃·g̃ = q·e_g + e_q·g − e_q·e_g, so by Cauchy-Schwarz the GEMM's operand rounding moves
    the distance by at most 2(‖q‖‖e_g‖ + ‖e_q‖‖g‖ + ‖e_q‖‖e_g‖). To that add the arithmetic:
    the product sum q̃·g̃ (int8: exact int32, then scaling; bf16: fp32 accumulation of exact
    products, any order: C·eps·‖q̃‖‖g̃‖), the fp32 norms and additions, and, where the library may
    round its output to bf16, 2⁻⁸ of the output magnitude. Norm maxima are over the candidates'
    positions. Everything is a worst case; nothing here is fitted to data.
    """
    qn, eq, qa = qr.norm, qr.resid, qr.approx_norm
    gn, eg = norm_max, resid_max
    ga = gn + eg  # ‖g̃‖ ≤ ‖g‖ + ‖e_g‖
    operand = 2.0 * (qn * eg + eq * gn + eq * eg)
    product = 2.0 * (channels + 4) * EPS32 * qa * ga
    out_mag = gn**2 + 2.0 * qa * ga
    norms = (channels + 2) * EPS32 * (qn**2 + gn**2)
    assembly = 2.0 * EPS32 * (qn**2 + out_mag)
    rounding = output_unit * out_mag
    return (operand + product + norms + assembly + rounding) * (1.0 + 1e-6)


class ExactLowpMatcher(NumpyMatcher):
    """SPADE kNN on the CPU's int8/bf16 units with an exact fp32 re-rank (equals the oracle)."""

    name = "exact-lowp"
    precision = "int8"
    thread_safe = True  # score_one holds the matcher's own lock around its engines and caches

    def __init__(
        self,
        gallery: GalleryArrays,
        *,
        precision: str | None = None,
        threads: int | None = None,
        min_channels: int = NARROW_CHANNELS,
        **knn: Unpack[KnnOptions],
    ) -> None:
        super().__init__(gallery, **knn)
        prec = precision or self.precision
        if prec not in ENGINES:
            raise ConfigError(f"precision must be one of {', '.join(ENGINES)}, got {prec!r}")
        self.precision = prec
        self.name = f"exact-{prec}"
        # Narrow levels (C < min_channels) are memory-bound: a low-precision GEMM saves nothing
        # there and its coarser rounding only adds candidates (Lite0's 24-channel level: 616 per
        # query at int8), so they run the fp32 oracle itself.
        self.lowp_levels = frozenset(
            i for i, lv in enumerate(gallery.contract.levels) if lv.channels >= min_channels
        )
        self._engines = {
            lv.channels: ENGINES[prec](lv.channels, threads)
            for i, lv in enumerate(gallery.contract.levels)
            if i in self.lowp_levels
        }
        self._blocks: list[dict[int, _Block]] = [{} for _ in gallery.contract.levels]
        self._lock = threading.Lock()
        self.stats = [CandidateStats() for _ in gallery.contract.levels]

    @property
    def engine(self) -> str:
        """The candidate engine (``numpy-fp32`` when every level is narrow)."""
        return next((e.name for e in self._engines.values()), "numpy-fp32")

    def _block(self, level: int, image: int) -> _Block:
        cache = self._blocks[level]
        bl = cache.get(image)
        if bl is None:
            g = np.asarray(self.gallery.levels[level][image], dtype=np.float32)
            eng = self._engines[g.shape[-1]]
            bl = cache[image] = eng.block(g.reshape(-1, g.shape[-1]))
        return bl

    def min_sq_distances(self, level: int, q: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Exact min over the positions of ``images`` of ‖q − g‖² for every row of ``q``."""
        lv = self.gallery.level_sqnorms[level]
        gal = self.gallery.levels[level]
        n_pos = int(np.prod(lv.shape[1:]))
        c = q.shape[1]
        eng = self._engines[c]
        qr = eng.query(q)
        p = len(q)
        best_apx = np.full(p, np.inf)
        exact = np.full(p, np.inf, dtype=np.float32)
        counts = np.zeros(p, dtype=np.int64)
        per_chunk = max(1, TILE_ELEMENTS // (n_pos * max(1, min(p, 1024))))
        rows_per = max(1, min(p, TILE_ELEMENTS // (n_pos * per_chunk)))
        gamma = 3.0 * (c + 2) * EPS32  # fp32 error of the re-rank's own distances
        for s in range(0, len(images), per_chunk):
            imgs = images[s : s + per_chunk]
            blocks = [self._block(level, int(i)) for i in imgs]
            bound = error_bound(
                qr,
                max(b.norm_max for b in blocks),
                max(b.resid_max for b in blocks),
                c,
                eng.output_unit,
            )
            ops = eng.operands(blocks)
            for r in range(0, p, rows_per):
                rs = slice(r, min(p, r + rows_per))
                y, m = eng.run(qr, rs, ops)
                qsq = qr.sqnorm[rs].astype(np.float64)
                cur = np.minimum(best_apx[rs], m + qsq)
                best_apx[rs] = cur
                b = bound[rs]
                # a position can be the nearest only if its approximate distance is within
                # 2·bound (+ the re-rank's own fp32 error) of the smallest approximate one
                thr = (cur + 2 * b + gamma * (np.maximum(cur, 0) + b) - qsq).astype(np.float32)
                thr = np.nextafter(thr, np.float32(np.inf))  # the float32 cast must not round down
                ri, ci = np.nonzero(y <= thr[:, None])
                if not ri.size:
                    continue
                img = imgs[ci // n_pos]
                pos = ci % n_pos
                cand = gal.reshape(gal.shape[0], n_pos, c)[img, pos].astype(np.float32)
                diff = q[r + ri] - cand
                d = np.einsum("ij,ij->i", diff, diff, dtype=np.float32)
                starts = np.flatnonzero(np.r_[True, ri[1:] != ri[:-1]])
                hit = r + ri[starts]
                exact[hit] = np.minimum(exact[hit], np.minimum.reduceat(d, starts))
                counts[hit] += np.diff(np.r_[starts, len(ri)])
        self.stats[level].add(counts)
        return exact

    def score_one(
        self, levels: list[np.ndarray], pooled: np.ndarray, exclude: int | None = None
    ) -> Score:
        k = max(self.k_image, self.k_gallery)
        idx, dist = nearest_images(pooled, self._pooled, self._pooled_sq, k, exclude)
        image_score = float(dist[: self.k_image].mean())
        near = idx[: self.k_gallery]  # nearest first: the running minimum tightens early
        maps = []
        with self._lock:
            for i, (lv, q) in enumerate(zip(self.gallery.contract.levels, levels, strict=True)):
                qf = np.ascontiguousarray(q, dtype=np.float32).reshape(-1, lv.channels)
                if i in self.lowp_levels:
                    d2 = self.min_sq_distances(i, qf, near)
                else:
                    g, gsq = self.gallery.levels[i], self.gallery.level_sqnorms[i]
                    d2 = min_sq_distances(qf, g, gsq, np.sort(near))
                maps.append(np.sqrt(d2).reshape(lv.height, lv.width))
        amap = combine_levels(maps, self.size, self.sigma)
        return Score(image_score, amap, idx)

    def candidate_stats(self) -> dict[str, dict[str, float | int]]:
        """Per low-precision level: query positions seen, mean and max candidates re-ranked
        exactly (narrow levels run the fp32 oracle and are listed as such)."""
        return {
            lv.name: st.summary() if i in self.lowp_levels else {"fp32": True}
            for i, (lv, st) in enumerate(zip(self.gallery.contract.levels, self.stats, strict=True))
        }

    def close(self) -> None:
        """Idempotent; score() afterwards raises (the Backend lifecycle)."""
        super().close()
        for e in self._engines.values():
            e.close()
        self._engines = {}
        self._blocks = [{} for _ in self._blocks]


class ExactInt8Matcher(ExactLowpMatcher):
    """int8 candidates (ONNX Runtime; VNNI/AMX-INT8 kernels, exact on AVX2 too)."""

    precision = "int8"


class ExactBf16Matcher(ExactLowpMatcher):
    """bf16 candidates (OpenVINO; AMX-BF16 / AVX512-BF16 kernels)."""

    precision = "bf16"


__all__ = [
    "CandidateStats",
    "ExactBf16Matcher",
    "ExactInt8Matcher",
    "ExactLowpMatcher",
    "bf16_round",
    "error_bound",
]
