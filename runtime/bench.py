"""Per-stage latency of the CPU pipeline, and the floor it is measured against.

The floor is what the hardware forces: backbone time + matching FLOPs / this machine's GEMM rate
(both measured in the same run). Stages: decode, preprocess, backbone, image kNN, pixel kNN per
level, upsample + blur, end to end. Medians of repeated runs; timings live here, never in tests.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.contract import Contract
from spade_edge.runtime.gallery import InMemoryGallery
from spade_edge.runtime.matchers.numpy_matcher import NumpyMatcher, min_sq_distances, nearest_images
from spade_edge.runtime.preprocess import load_image, preprocess
from spade_edge.runtime.runners.ort import OrtRunner
from spade_edge.runtime.scoring import combine_levels


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


def matching_flops(contract: Contract, k_gallery: int) -> float:
    """FLOPs of the pixel kNN: per level 2·Q·(K·HW)·C (the pooled kNN is negligible)."""
    return float(
        sum(2 * lv.positions * k_gallery * lv.positions * lv.channels for lv in contract.levels)
    )


def random_gallery(contract: Contract, n_images: int, seed: int = 0) -> InMemoryGallery:
    """A gallery of random features with a model's shapes (for timing only)."""
    rng = np.random.default_rng(seed)
    levels = [
        rng.random((n_images, lv.height, lv.width, lv.channels), dtype=np.float32)
        for lv in contract.levels
    ]
    return InMemoryGallery.from_features(
        contract, levels, rng.random((n_images, contract.pooled_dim), dtype=np.float32)
    )


def bench_cpu(
    model: Path,
    image: Path,
    ks: tuple[int, ...] = (5, 50),
    n_gallery: int = 64,
    repeats: int = 5,
    gemm_rate: float | None = None,
) -> list[dict[str, Any]]:
    """Rows of stage medians (ms) per K for one model on the ORT CPU runner + NumPy matcher."""
    runner = OrtRunner(model)
    c = runner.contract
    gallery = random_gallery(c, max(n_gallery, max(ks)))
    rate = gemm_rate or gemm_gflops()
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
        idx, _ = nearest_images(q_pooled, m._pooled, m._pooled_sq, k)
        sel = np.sort(idx)
        img_knn = median_ms(
            lambda m=m, k=k: nearest_images(q_pooled, m._pooled, m._pooled_sq, k), repeats
        )
        per_level = []
        maps = []
        for q, g, gsq, lv in zip(
            q_levels, gallery.levels, gallery.level_sqnorms, c.levels, strict=True
        ):
            per_level.append(
                median_ms(
                    lambda q=q, g=g, gsq=gsq, sel=sel: min_sq_distances(q, g, gsq, sel),
                    repeats,
                )
            )
            maps.append(np.sqrt(min_sq_distances(q, g, gsq, sel)).reshape(lv.height, lv.width))
        post = median_ms(lambda maps=maps: combine_levels(maps, c.image_size, 4.0), repeats)

        def e2e(m: NumpyMatcher = m) -> None:
            im = load_image(image)
            m.score(runner.infer(preprocess(im, c).tensor[None]))

        total = median_ms(e2e, repeats)
        flops = matching_flops(c, k)
        floor = backbone + flops / (rate * 1e9) * 1000
        rows.append(
            {
                "backbone": c.backbone,
                "k": k,
                "decode_ms": decode,
                "preprocess_ms": prep_ms,
                "backbone_ms": backbone,
                "image_knn_ms": img_knn,
                **{f"pixel_knn_{lv.name}_ms": t for lv, t in zip(c.levels, per_level, strict=True)},
                "upsample_blur_ms": post,
                "end_to_end_ms": total,
                "matching_gflop": flops / 1e9,
                "gemm_gflops": rate,
                "floor_ms": floor,
                "ratio_to_floor": total / floor,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    runner.close()
    return rows
