"""Benchmark of the CUDA matcher: per-stage device times and the fused kernel against cuBLAS.

Stages are timed with CUDA events on the matcher's stream (pooled kNN + top-K, each level's
fused kernel, upsample + mean + blur, D2H). The fused kernel's rate counts 2·Q·M·C FLOPs
(Q query positions, M = K·P gallery positions, C channels) and is compared with a cuBLAS fp16
GEMM of the same shape, measured with CuPy here only, never in the runtime.
The gallery is random data of the backbone's shapes (runtime.synthetic): 32 random images
repeated to N, so a 1,000-image wrn50 gallery (2.8 GB) costs no host-side generation time.

Run: ``spade bench --matcher cuda [--k 50] [--n-gallery 1000] [--sweep]`` (the command lives in
spade_edge.cli.bench; this module is the library part).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from spade_edge.runtime.contract import Contract
from spade_edge.runtime.errors import CompatibilityError
from spade_edge.runtime.matchers.cuda import CudaMatcher, import_driver
from spade_edge.runtime.runners.base import Features
from spade_edge.runtime.synthetic import random_gallery, shaped_contract

WRN50: dict[str, Any] = {
    "backbone": "wrn50",
    "levels": [("layer1", 56, 56, 256), ("layer2", 28, 28, 512), ("layer3", 14, 14, 1024)],
    "pooled": 2048,
    "image_size": 224,
}
LITE0: dict[str, Any] = {
    "backbone": "efficientnet_lite0",
    "levels": [("block2", 56, 56, 24), ("block4", 28, 28, 40), ("block10", 14, 14, 112)],
    "pooled": 1280,
    "image_size": 224,
}
BACKBONES = {"wrn50": WRN50, "efficientnet_lite0": LITE0, "lite0": LITE0}


def _device_query(drv: Any, contract: Contract, seed: int) -> tuple[Features, list[Any]]:
    """One image's fp32 features in device memory, as the TensorRT runner hands them over."""
    rng = np.random.default_rng(seed + 1)
    bufs = []
    for lv in contract.levels:
        a = np.abs(rng.standard_normal((1, lv.height, lv.width, lv.channels), dtype=np.float32))
        bufs.append(drv.to_device(a))
    pooled = drv.to_device(np.abs(rng.standard_normal((1, contract.pooled_dim), np.float32)))
    f = Features(
        levels=list(bufs),
        pooled=pooled,
        batch=1,
        device=True,
        dtypes=("float32",) * (len(bufs) + 1),
    )
    return f, [*bufs, pooled]


def gemm_tflops(q: int, m: int, c: int, repeats: int = 10) -> float | None:
    """cuBLAS fp16 GEMM rate for [q, c] x [c, m] via CuPy (benchmark only; the runtime itself
    never uses CuPy or torch). None when CuPy is missing."""
    try:
        import cupy as cp
    except ImportError:
        return None
    flops = 2.0 * q * m * c
    a = cp.random.standard_normal((q, c), dtype=cp.float32).astype(cp.float16)
    b = cp.random.standard_normal((c, m), dtype=cp.float32).astype(cp.float16)
    out = cp.empty((q, m), dtype=cp.float16)
    for _ in range(3):
        cp.matmul(a, b, out=out)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(repeats):
        cp.matmul(a, b, out=out)
    end.record()
    end.synchronize()
    ms = cp.cuda.get_elapsed_time(start, end) / repeats
    del a, b, out
    cp.get_default_memory_pool().free_all_blocks()
    return float(flops / (ms * 1e-3) / 1e12)


def _median_stages(m: Any, f: Features, repeats: int) -> tuple[dict[str, float], float]:
    for _ in range(3):
        m.score(f)
    runs: list[dict[str, float]] = []
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m.score(f)
        walls.append((time.perf_counter() - t0) * 1e3)
        runs.append(dict(m.stage_ms))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}, statistics.median(walls)


def bench_cuda_matcher(
    backbone_shapes: dict[str, Any] = WRN50,
    k: int | Sequence[int] = 50,
    n_gallery: int = 1000,
    repeats: int = 20,
    gemm: bool = True,
    block_rows: Sequence[int | None] = (None,),
    device: int = 0,
) -> list[dict[str, Any]]:
    """One row per (K, block-rows variant): median device ms per stage, fused TFLOP/s vs GEMM.

    ``block_rows`` sweeps the fused kernel's query rows per CTA (None = the automatic choice);
    variants that do not fit the GPU's shared memory are skipped.
    """
    drv = import_driver()
    ks = [k] if isinstance(k, int) else list(k)
    sh = backbone_shapes
    contract = shaped_contract(sh["levels"], sh["pooled"], sh["image_size"], str(sh["backbone"]))
    gal = random_gallery(contract, n_gallery, features="relu", distinct=32)
    gemm_rates: dict[tuple[int, int, int], float | None] = {}
    rows: list[dict[str, Any]] = []
    for kk in ks:
        m = CudaMatcher(gal, k_image=kk, k_gallery=kk, device=device)
        with m._gpu.active():
            f, keep = _device_query(drv, contract, 0)
        try:
            m.profile = True
            for bm in block_rows:
                try:
                    m.set_block_rows(bm)
                except CompatibilityError:
                    continue
                stages, wall = _median_stages(m, f, repeats)
                row: dict[str, Any] = {
                    "backbone": contract.backbone,
                    "k": kk,
                    "n_gallery": n_gallery,
                    "block_rows": "auto" if bm is None else bm,
                    "device": m.device_name,
                }
                row.update({f"{name}_ms": round(v, 4) for name, v in stages.items()})
                for lv, plan in zip(contract.levels, m.plan(), strict=True):
                    q, mm, c = lv.positions, kk * lv.positions, lv.channels
                    t = stages[f"fused_{lv.name}"]
                    rate = 2.0 * q * mm * c / (t * 1e-3) / 1e12
                    row[f"fused_{lv.name}_tflops"] = round(rate, 1)
                    row[f"plan_{lv.name}"] = f"BM={plan['block_rows']} x{plan['splits']}"
                    if gemm:
                        key = (q, mm, c)
                        if key not in gemm_rates:
                            gemm_rates[key] = gemm_tflops(q, mm, c)
                        g = gemm_rates[key]
                        if g:
                            row[f"gemm_{lv.name}_tflops"] = round(g, 1)
                            row[f"fused_vs_gemm_{lv.name}"] = round(rate / g, 3)
                row["wall_ms_per_image"] = round(wall, 3)
                rows.append(row)
        finally:
            with m._gpu.active():
                for b in keep:
                    b.free()
            m.close()
    return rows
