"""The shipped CUDA kernels, executed one by one on the SIMT emulator, against NumPy.

What this adds to test_cuda_matcher.py (which runs them through CudaMatcher): the fused kernel
under both cp.async completion orders and several thread interleavings, split-M merging with
many splits, the ldmatrix bank-conflict count, and the emulator's own mma fragment layout.
Logic only: speed and real-hardware behaviour are the GPU run's business (make device-check).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spade_edge.runtime.matchers import cuda as cm
from spade_edge_testing import simt_device

INF_BITS = 0x7F800000
pytestmark = pytest.mark.simt


@pytest.fixture(scope="module")
def lib(request: pytest.FixtureRequest) -> Path:
    return simt_device.session_library(request)


def test_emulated_mma_follows_the_ptx_fragment_table(lib: Path) -> None:
    """Fragments built by hand from the PTX ISA table multiply like A @ B (+ C = 1)."""
    dev = simt_device.Device(lib)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 16)).astype(np.float16)
    bt = rng.standard_normal((8, 16)).astype(np.float16)
    d = dev.alloc(16 * 8 * 4)
    dev.launch("simt_selftest_mma", (1,), (32,), "PPP", dev.upload(a), dev.upload(bt), d)
    want = a.astype(np.float64) @ bt.astype(np.float64).T + 1
    np.testing.assert_allclose(dev.view(d, np.float32, 128).reshape(16, 8), want, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eager", [False, True])
def test_emulator_racecheck_needs_the_barrier(lib: Path, eager: bool, seed: int) -> None:
    """Reading rows other lanes copied, with and without __syncthreads between (the error is a
    read-after-copy or a copy-after-read, depending on the interleaving)."""
    dev = simt_device.Device(lib, seed=seed, eager=eager)
    src = dev.upload(np.arange(32 * 8, dtype=np.float16))
    out = dev.alloc(32 * 4 * 4)
    dev.launch("simt_selftest_race", (1,), (32,), "PiP", src, 1, out, shared=32 * 16)
    with pytest.raises(simt_device.SimtError, match="after the last barrier"):
        dev.launch("simt_selftest_race", (1,), (32,), "PiP", src, 0, out, shared=32 * 16)


def _knn_case(dev, rng, bm, nq, c, n, p, idx, splits, tie=False):
    cp = cm.padded_channels(c)
    q = np.zeros((nq, cp), np.float16)
    g = np.zeros((n * p, cp), np.float16)
    q[:, :c] = np.abs(rng.standard_normal((nq, c)))
    g[:, :c] = np.abs(rng.standard_normal((n * p, c)))
    if tie:  # some queries equal gallery rows exactly: distance 0 after the clamp
        q[: min(nq, p) : 3] = g[idx[0] * p : idx[0] * p + min(nq, p) : 3]
    qn = (q.astype(np.float32) ** 2).sum(1)
    gn = (g.astype(np.float32) ** 2).sum(1)
    k = len(idx)
    tiles = -(-(k * p) // cm.BN)
    per = -(-tiles // splits)
    out = dev.upload(np.full(nq, INF_BITS, np.uint32))
    args = [dev.upload(q), dev.upload(qn), nq, dev.upload(g), dev.upload(gn)]
    args += [dev.upload(np.asarray(idx, np.int32)), p, k, cp, per, out]
    grid = (-(-nq // bm), -(-tiles // per))
    dev.launch(
        f"knn_min_bm{bm}", grid, (256,), "PPiPPPiiiiP", *args, shared=cm.fused_smem_bytes(bm, cp)
    )
    rows = (np.asarray(idx)[:, None] * p + np.arange(p)).reshape(-1)
    qd, gd = q.astype(np.float64), g[rows].astype(np.float64)
    want = np.maximum((qd**2).sum(1)[:, None] + (gd**2).sum(1)[None] - 2 * qd @ gd.T, 0).min(1)
    return dev.view(out, np.float32, nq).copy(), want


CASES = [  # bm, queries, channels, gallery images, positions, selected images, splits
    (128, 150, 200, 5, 61, [4, 1, 3], 3),
    (64, 33, 72, 3, 129, [1], 2),
    (32, 90, 130, 4, 50, [3, 2, 1, 0], 1),
    (16, 100, 40, 4, 70, [2, 0, 3], 2),
    (128, 20, 256, 2, 300, [1, 0], 5),
    (64, 50, 24, 5, 200, [4, 0, 2], 1),  # one channel chunk: the 4-slot norm ring
]


@pytest.mark.parametrize("eager", [False, True], ids=["deferred-cp.async", "eager-cp.async"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"bm{c[0]}-q{c[1]}-c{c[2]}-s{c[6]}")
def test_fused_knn_matches_float64(lib: Path, case, eager: bool, seed: int) -> None:
    """Row minima of ||q-g||^2 over the selected images: fp32 rounding of exact fp16 products."""
    dev = simt_device.Device(lib, seed=seed, eager=eager)
    got, want = _knn_case(dev, np.random.default_rng(seed), *case, tie=True)
    scale = want.max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


def test_fused_knn_ldmatrix_is_bank_conflict_free(lib: Path) -> None:
    """Every ldmatrix of every variant takes one 128-byte wavefront per 8x8 matrix (swizzle)."""
    dev = simt_device.Device(lib)
    rng = np.random.default_rng(3)
    for case in CASES:
        before = dev.counters()
        _knn_case(dev, rng, *case)
        after = dev.counters()
        matrices = after["ldmatrix_matrices"] - before["ldmatrix_matrices"]
        assert matrices > 0
        assert after["ldmatrix_wavefronts"] - before["ldmatrix_wavefronts"] == matrices, case


@pytest.mark.parametrize("half", [0, 1])
def test_prep_query_pads_rounds_and_resets(lib: Path, half: int) -> None:
    dev = simt_device.Device(lib)
    rng = np.random.default_rng(4)
    p, c = 37, 40
    cp = cm.padded_channels(c)
    x = rng.standard_normal((p, c)).astype(np.float16 if half else np.float32)
    dst, qn, mins = dev.alloc(p * cp * 2), dev.alloc(p * 4), dev.alloc(p * 4)
    args = (dev.upload(x), half, p, c, cp, dst, qn, mins)
    dev.launch("prep_query", (-(-p // 8),), (256,), "PiiiiPPP", *args)
    h = dev.view(dst, np.float16, p * cp).reshape(p, cp)
    np.testing.assert_array_equal(h[:, :c], x.astype(np.float16))
    assert not h[:, c:].any()
    want_qn = (h.astype(np.float64) ** 2).sum(1)
    np.testing.assert_allclose(dev.view(qn, np.float32, p), want_qn, rtol=1e-6)
    assert (dev.view(mins, np.uint32, p) == INF_BITS).all()


@pytest.mark.parametrize("n", [1, 7, 64, 300])
def test_pooled_knn_and_topk_rank_like_a_stable_argsort(lib: Path, n: int) -> None:
    dev = simt_device.Device(lib)
    rng = np.random.default_rng(n)
    cg = 96
    g = np.abs(rng.standard_normal((n, cg))).astype(np.float16)
    g[n // 2 :: 3] = g[0]  # exact ties with image 0
    q = g[0].astype(np.float32)
    gn = (g.astype(np.float64) ** 2).sum(1)
    dist = dev.alloc(n * 8)
    dev.launch(
        "pooled_dist", (max(1, -(-n // 8)),), (256,), "PiiPPiP",
        dev.upload(q), 0, cg, dev.upload(g), dev.upload(gn), n, dist, shared=cg * 8 + 256,
    )  # fmt: skip
    d = dev.view(dist, np.float64, n).copy()
    want = np.maximum(q.astype(np.float64) @ q + gn - 2 * g.astype(np.float64) @ q, 0)
    np.testing.assert_allclose(d, want, rtol=1e-12, atol=1e-9)
    kmax = min(n, 5)
    npad = 1 << max(1, (n - 1).bit_length())
    nbr, score = dev.alloc(kmax * 4), dev.alloc(4)
    dev.launch(
        "topk_select", (1,), (1024,), "PiiiiPP", dist, n, npad, min(n, 3), kmax, nbr, score,
        shared=npad * 12,
    )  # fmt: skip
    order = np.argsort(d, kind="stable")
    np.testing.assert_array_equal(dev.view(nbr, np.int32, kmax), order[:kmax])
    want_score = np.sqrt(d[order[: min(n, 3)]]).mean()
    assert dev.view(score, np.float32, 1)[0] == pytest.approx(want_score, rel=1e-6)


def test_upsample_and_blur_match_the_cpu_scoring(lib: Path) -> None:
    """sqrt, bilinear (align_corners=False), level mean and scipy's reflect Gaussian."""
    from scipy.ndimage import gaussian_filter

    from spade_edge.runtime.scoring import upsample_bilinear

    dev = simt_device.Device(lib)
    rng = np.random.default_rng(5)
    s, sigma = 40, 4.0
    shapes = [(10, 10), (5, 5), (3, 2)]
    maps = [rng.uniform(0, 9, hw).astype(np.float32) for hw in shapes]
    offs = np.cumsum([0] + [h * w for h, w in shapes])[:-1]
    minbuf = dev.upload(np.concatenate([m.reshape(-1) for m in maps]).view(np.uint32))
    rows = [[o, h, w] for o, (h, w) in zip(offs, shapes, strict=True)]
    table = dev.upload(np.array(rows, np.int32))
    w = cm.gaussian_weights(sigma)
    r = (len(w) - 1) // 2
    a, b, out, wp = dev.alloc(s * s * 4), dev.alloc(s * s * 4), dev.alloc(s * s * 4), dev.upload(w)
    grid, block = (-(-s // 32), -(-s // 8)), (32, 8)
    dev.launch("upsample_mean", grid, block, "PPiiP", minbuf, table, len(shapes), s, a)
    dev.launch("blur_pass", grid, block, "PPiPii", a, b, s, wp, r, 1)
    dev.launch("blur_pass", grid, block, "PPiPii", b, out, s, wp, r, 0)
    mean = np.mean([upsample_bilinear(np.sqrt(m), s) for m in maps], axis=0)
    np.testing.assert_allclose(dev.view(a, np.float32, s * s).reshape(s, s), mean, rtol=1e-5)
    want = gaussian_filter(mean.astype(np.float64), sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(dev.view(out, np.float32, s * s).reshape(s, s), want, rtol=1e-5)
