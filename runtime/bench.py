"""Per-stage latency of the CPU pipeline, and the floor it is measured against.

The floor is what the hardware forces: backbone time + matching FLOPs / the fastest matrix unit's
GEMM rate (fp32 BLAS, int8 via ONNX Runtime, bf16 via OpenVINO: each peak measured by a
micro-benchmark in the same run, never taken from a datasheet). Stages: decode, preprocess,
backbone, image kNN, pixel kNN per level, upsample + blur, end to end. Medians of repeated
runs; timings live here, never in tests.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.autoselect import select_matcher
from spade_edge.runtime.contract import Contract
from spade_edge.runtime.cpu_features import cpu_units
from spade_edge.runtime.matchers import open_matcher
from spade_edge.runtime.matchers.exact_lowp import _Int8Engine
from spade_edge.runtime.matchers.numpy_matcher import NumpyMatcher, min_sq_distances, nearest_images
from spade_edge.runtime.preprocess import load_image, preprocess
from spade_edge.runtime.runners.ort import OrtRunner
from spade_edge.runtime.scoring import DEFAULT_SIGMA, combine_levels
from spade_edge.runtime.synthetic import random_gallery


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(ts)


def gemm_gflops(n: int = 2048, repeats: int = 7) -> float:
    """Peak fp32 GEMM rate of this machine's BLAS (the matcher's engine): the best of several
    runs, so the floor is the hardware's, not a noisy moment's (which makes our ratio honest)."""
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    c = np.empty_like(a)
    np.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _int8_gemm_ops(n: int, repeats: int) -> float:
    """u8 × s8 GEMM through the exact int8 matcher's own graph (ONNX Runtime)."""
    rng = np.random.default_rng(0)
    sess = _Int8Engine(n, None).session
    feed = {
        "A": rng.integers(0, 256, (n, n), dtype=np.uint8),
        "B": rng.integers(-64, 64, (n, n), dtype=np.int8),
        "a_scale": np.array(0.01, dtype=np.float32),
        "b_scale": np.full(n, 0.01, dtype=np.float32),
        "a_zero": np.array(0, dtype=np.uint8),
        "b_zero": np.zeros(n, dtype=np.int8),
        "bias": np.zeros(n, dtype=np.float32),
    }
    return _best_rate(lambda: sess.run(["M"], feed), n, repeats)


def _bf16_gemm_ops(n: int, repeats: int) -> tuple[float, str]:
    """OpenVINO MatMul compiled with the bf16 precision hint; returns (rate, what ran)."""
    import openvino as ov
    import openvino.opset13 as ops

    a = ops.parameter([n, n], ov.Type.f32)
    b = ops.parameter([n, n], ov.Type.f32)
    cm = ov.Core().compile_model(
        ov.Model([ops.matmul(a, b, False, False)], [a, b]),
        "CPU",
        {"INFERENCE_PRECISION_HINT": "bf16"},
    )
    hint = cm.get_property("INFERENCE_PRECISION_HINT")
    req = cm.create_infer_request()
    rng = np.random.default_rng(0)
    x, y = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    rate = _best_rate(lambda: req.infer({0: x, 1: y}), n, repeats)
    return rate, str(getattr(hint, "to_string", lambda: hint)())


def _best_rate(fn: Callable[[], Any], n: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def matrix_peaks(n: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """Peak GEMM rate (G multiply-adds x2 per second) of every matrix path present here.

    fp32: NumPy's BLAS; int8: ONNX Runtime u8s8 (VNNI/AMX-INT8 where present, else AVX2);
    bf16: OpenVINO with the bf16 hint (``bf16_runs`` says whether it really ran bf16 or kept
    f32 on a CPU without bf16 units). ``best`` names the fastest *present* unit, the floor's:
    int8 counts only where the CPU has int8 dot-product units, bf16 only where OpenVINO really
    ran bf16 (emulated formats are not the hardware's limit, and on shared cores their noisy
    timings would otherwise pick the floor at random).
    """
    peaks: dict[str, Any] = {"fp32": gemm_gflops(n, repeats)}
    try:
        peaks["int8"] = _int8_gemm_ops(n, repeats)
    except Exception as e:  # the bench reports what it could not measure
        peaks["int8_error"] = str(e).splitlines()[0]
    try:
        rate, ran = _bf16_gemm_ops(n, repeats)
        peaks["bf16"], peaks["bf16_runs"] = rate, ran
    except ImportError:
        peaks["bf16_error"] = "openvino not installed"
    units = cpu_units()
    present = {"fp32": True, "int8": units.int8, "bf16": peaks.get("bf16_runs") == "bf16"}
    rates = {k: v for k, v in peaks.items() if present.get(k)}
    peaks["best"] = max(rates, key=lambda k: rates[k])
    return peaks


def matching_flops(contract: Contract, k_gallery: int) -> float:
    """FLOPs of the pixel kNN: per level 2·Q·(K·HW)·C (the pooled kNN is negligible)."""
    return float(
        sum(2 * lv.positions * k_gallery * lv.positions * lv.channels for lv in contract.levels)
    )


def bench_cpu(
    model: Path,
    image: Path,
    ks: tuple[int, ...] = (5, 50),
    n_gallery: int = 64,
    repeats: int = 5,
    gemm_rate: float | None = None,
    peaks: dict[str, Any] | None = None,
    matcher: str = "numpy",
) -> list[dict[str, Any]]:
    """Rows of stage medians (ms) per K for one model on the ORT CPU runner.

    Stage rows time the NumPy matcher's parts; ``end_to_end_ms`` uses ``matcher`` (``auto``:
    what this CPU's auto-selection picks). The floor divides the matching FLOPs by the fastest
    matrix unit's measured peak (``peaks``; ``gemm_rate`` alone = fp32 only).
    """
    runner = OrtRunner(model)
    c = runner.contract
    gallery = random_gallery(c, max(n_gallery, max(ks)))
    if peaks is None:
        peaks = {"fp32": gemm_rate or gemm_gflops(), "best": "fp32"}
    unit = peaks["best"]
    rate = float(peaks[unit])
    matcher_name = select_matcher()[0] if matcher == "auto" else matcher
    decode = median_ms(lambda: load_image(image), repeats)
    pil = load_image(image)
    prep_ms = median_ms(lambda: preprocess(pil, c), repeats)
    x = preprocess(pil, c).tensor[None]
    backbone = median_ms(lambda: runner.infer(x), repeats)
    f = runner.infer(x)
    q_levels = [lv[0].reshape(-1, lv.shape[-1]) for lv in f.levels]
    q_pooled = f.pooled[0]
    rows = []
    for k in ks:
        m = NumpyMatcher(gallery, k_image=k, k_gallery=k)
        e2e_matcher = (
            m
            if matcher_name == "numpy"
            else open_matcher(gallery, matcher_name, k_image=k, k_gallery=k)
        )
        idx, _ = nearest_images(q_pooled, m._pooled, m._pooled_sq, k)
        sel = np.sort(idx)
        img_knn = median_ms(partial(nearest_images, q_pooled, m._pooled, m._pooled_sq, k), repeats)
        per_level = []
        maps = []
        for q, g, gsq, lv in zip(
            q_levels, gallery.levels, gallery.level_sqnorms, c.levels, strict=True
        ):
            per_level.append(median_ms(partial(min_sq_distances, q, g, gsq, sel), repeats))
            maps.append(np.sqrt(min_sq_distances(q, g, gsq, sel)).reshape(lv.height, lv.width))
        post = median_ms(partial(combine_levels, maps, c.image_size, DEFAULT_SIGMA), repeats)

        def e2e(m: Any = e2e_matcher) -> None:
            im = load_image(image)
            m.score(runner.infer(preprocess(im, c).tensor[None]))

        total = median_ms(e2e, repeats)
        if e2e_matcher is not m:
            e2e_matcher.close()
        flops = matching_flops(c, k)
        floor = backbone + flops / (rate * 1e9) * 1000
        rows.append(
            {
                "backbone": c.backbone,
                "k": k,
                "matcher": matcher_name,
                "decode_ms": decode,
                "preprocess_ms": prep_ms,
                "backbone_ms": backbone,
                "image_knn_ms": img_knn,
                **{f"pixel_knn_{lv.name}_ms": t for lv, t in zip(c.levels, per_level, strict=True)},
                "upsample_blur_ms": post,
                "end_to_end_ms": total,
                "matching_gflop": flops / 1e9,
                "gemm_gflops": peaks["fp32"],
                **{f"{u}_gemm_gops": peaks[u] for u in ("int8", "bf16") if u in peaks},
                "floor_unit": unit,
                "floor_ms": floor,
                "ratio_to_floor": total / floor,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    runner.close()
    return rows
