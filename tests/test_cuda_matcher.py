"""CUDA matcher: agrees with the NumPy oracle, reads device features, allocates nothing per image.

GPU tests (marker ``gpu``) skip with a reason when pycuda or a CUDA device is missing; the
planning helpers (block rows, splits, blur weights) are checked on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import correlate1d, gaussian_filter1d

from spade_edge.runtime.contract import Contract, Level, resize_for
from spade_edge.runtime.errors import BackendUnavailableError, CompatibilityError, ConfigError
from spade_edge.runtime.matchers import cuda as cm
from spade_edge.runtime.matchers.numpy_matcher import NumpyMatcher
from spade_edge.runtime.runners.base import Features

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fakes
@dataclass
class FakeGallery:
    """GalleryArrays from random (or given) features: fp16 values, norms of the fp16 values."""

    contract: Contract
    pooled: np.ndarray
    levels: list[np.ndarray]
    path: str = "fake.gallery"
    pooled_sqnorms: np.ndarray = field(init=False)
    level_sqnorms: list[np.ndarray] = field(init=False)
    n_images: int = field(init=False)

    def __post_init__(self) -> None:
        self.pooled = self.pooled.astype(np.float16)
        self.levels = [a.astype(np.float16) for a in self.levels]
        self.n_images = len(self.pooled)
        self.pooled_sqnorms = (self.pooled.astype(np.float32) ** 2).sum(-1)
        self.level_sqnorms = [(a.astype(np.float32) ** 2).sum(-1) for a in self.levels]


def make_contract(shapes: list[tuple[int, int, int]], pooled_dim: int, size: int) -> Contract:
    levels = tuple(
        Level(name=f"l{i}", stride=4 << i, channels=c, height=h, width=w)
        for i, (h, w, c) in enumerate(shapes)
    )
    return Contract(
        backbone="test",
        weights="random",
        levels=levels,
        pooled_dim=pooled_dim,
        image_size=size,
        resize=resize_for(size),
    )


def random_features(rng: np.random.Generator, contract: Contract, n: int) -> Features:
    """Post-ReLU-like features (non-negative, varied scale per channel)."""
    levels = []
    for lv in contract.levels:
        scale = rng.uniform(0.2, 2.0, size=lv.channels).astype(np.float32)
        a = np.abs(rng.standard_normal((n, lv.height, lv.width, lv.channels), dtype=np.float32))
        levels.append(a * scale)
    pooled = np.abs(rng.standard_normal((n, contract.pooled_dim), dtype=np.float32))
    return Features(levels=levels, pooled=pooled, batch=n)


def make_gallery(
    rng: np.random.Generator, shapes: list[tuple[int, int, int]], pooled_dim: int, n: int, size=32
) -> FakeGallery:
    c = make_contract(shapes, pooled_dim, size)
    f = random_features(rng, c, n)
    return FakeGallery(c, f.pooled, f.levels)


def assert_matches(got, want, rtol: float = 2e-3) -> None:
    """Same neighbours exactly; image score to fp64 rounding; maps within fp16 tolerance."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.neighbors, w.neighbors)
        assert g.image_score == pytest.approx(w.image_score, rel=1e-5)
        assert g.anomaly_map.shape == w.anomaly_map.shape
        assert g.anomaly_map.dtype == np.float32
        scale = float(np.abs(w.anomaly_map).max())
        np.testing.assert_allclose(g.anomaly_map, w.anomaly_map, rtol=rtol, atol=rtol * scale)


# ----------------------------------------------------------------------------- CPU-side checks
def test_gaussian_weights_are_scipys() -> None:
    x = np.random.default_rng(0).standard_normal(300)
    for sigma in (4.0, 1.5):
        w = cm.gaussian_weights(sigma).astype(np.float64)
        assert len(w) == 2 * int(4 * sigma + 0.5) + 1
        np.testing.assert_allclose(
            correlate1d(x, w, mode="reflect"),
            gaussian_filter1d(x, sigma, mode="reflect", truncate=4.0),
            rtol=1e-6,
            atol=1e-6,
        )


@pytest.mark.parametrize("seed", range(5))
def test_splits_cover_every_tile_once(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(50):
        rb, tiles, slots = (int(v) for v in rng.integers(1, [40, 2000, 600]))
        splits, per = cm.choose_splits(rb, tiles, slots, 128)
        assert splits * per >= tiles  # every tile has a CTA
        assert (splits - 1) * per < tiles  # no CTA without work


def test_block_rows_fit_shared_memory() -> None:
    for optin in (101376, 166912, 232448):  # sm_89, sm_87, sm_90 per-block limits
        for p, c in [(3136, 256), (784, 512), (196, 1024), (49, 2048), (3136, 24)]:
            cp = cm.padded_channels(c)
            if cm.fused_smem_bytes(cm.BM_CHOICES[-1], cp) > optin:
                with pytest.raises(CompatibilityError, match="shared memory"):
                    cm.choose_block_rows(p, cp, optin)
                continue
            bm = cm.choose_block_rows(p, cp, optin)
            assert cm.fused_smem_bytes(bm, cp) <= optin
            assert bm in cm.BM_CHOICES
            bigger = [b for b in cm.BM_CHOICES if b > bm]
            assert all(cm.fused_smem_bytes(b, cp) > optin or b >= 2 * p for b in bigger)
    # wrn50 on every target: every level fits (layer3 needs the 16-row variant on sm_89)
    for optin in (101376, 166912, 232448):
        for p, c in [(3136, 256), (784, 512), (196, 1024)]:
            cm.choose_block_rows(p, cm.padded_channels(c), optin)


def test_backend_unavailable_without_pycuda() -> None:
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        g = make_gallery(np.random.default_rng(0), [(4, 4, 8)], 8, 3)
        with pytest.raises(BackendUnavailableError, match="pycuda"):
            cm.CudaMatcher(g)
    else:
        pytest.skip("pycuda is installed here")


# ----------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def drv():
    try:
        import pycuda.driver as drv
    except Exception as e:
        pytest.skip(f"pycuda not importable: {e}")
    try:
        drv.init()
        if drv.Device.count() == 0:
            pytest.skip("no CUDA device")
    except Exception as e:
        pytest.skip(f"CUDA unavailable: {e}")
    return drv


@pytest.fixture()
def ctx(drv):
    """The primary context made current (for tests that allocate device buffers themselves)."""
    c = drv.Device(0).retain_primary_context()
    c.push()
    yield c
    drv.Context.pop()


def run_both(g, feats: Features, **kw):
    want = NumpyMatcher(g, **{k: v for k, v in kw.items() if k != "block_rows"}).score(feats)
    m = cm.CudaMatcher(g, **kw)
    try:
        got = m.score(feats)
    finally:
        m.close()
    return got, want


@pytest.mark.gpu
def test_random_odd_sizes(drv) -> None:
    """Positions and channels that are not multiples of the tiles; batch of 2."""
    rng = np.random.default_rng(1)
    g = make_gallery(rng, [(9, 7, 40), (13, 11, 72), (5, 3, 136)], 48, 9, size=40)
    f = random_features(rng, g.contract, 2)
    got, want = run_both(g, f, k_image=3, k_gallery=4)
    assert_matches(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("block_rows", [None, 128, 64, 32, 16])
def test_wrn50_like_every_block_variant(drv, block_rows) -> None:
    """wrn50-sized layer1/layer2 (+ an odd level) with each fused-kernel variant."""
    rng = np.random.default_rng(2)
    g = make_gallery(rng, [(56, 56, 256), (28, 28, 512), (13, 11, 200)], 256, 6, size=224)
    f = random_features(rng, g.contract, 1)
    try:
        got, want = run_both(g, f, k_image=3, k_gallery=5, block_rows=block_rows)
    except CompatibilityError as e:
        pytest.skip(f"variant does not fit this GPU: {e}")
    assert_matches(got, want)


@pytest.mark.gpu
def test_k1_and_k_equals_n(drv) -> None:
    rng = np.random.default_rng(3)
    g = make_gallery(rng, [(14, 14, 64), (7, 7, 128)], 64, 11, size=56)
    f = random_features(rng, g.contract, 2)
    for k in (1, 11):
        got, want = run_both(g, f, k_image=k, k_gallery=k)
        assert_matches(got, want)
    with pytest.raises(ConfigError):
        cm.CudaMatcher(g, k_image=12)


@pytest.mark.gpu
def test_ties_go_to_lower_index(drv) -> None:
    """Duplicated gallery images: equal distances rank by index, as a stable argsort."""
    rng = np.random.default_rng(4)
    shapes = [(8, 8, 32), (4, 4, 64)]
    base = make_gallery(rng, shapes, 32, 8)
    order = [0, 5, 1, 5, 2, 2, 3, 5]  # copies of 5 at 1, 3, 7 and of 2 at 4, 5
    g = FakeGallery(base.contract, base.pooled[order], [a[order] for a in base.levels])
    # pooled exactly base image 5 (a three-way tie at distance 0); levels perturbed so the
    # map is not identically zero
    q = Features(
        levels=[a[[1]].astype(np.float32) + rng.uniform(0, 0.5, a[[1]].shape) for a in g.levels],
        pooled=g.pooled[[1]].astype(np.float32),
        batch=1,
    )
    got, want = run_both(g, q, k_image=3, k_gallery=5)
    assert list(got[0].neighbors[:3]) == [1, 3, 7]
    assert_matches(got, want)


@pytest.mark.gpu
def test_device_pointer_input(drv, ctx) -> None:
    """TensorRT-style device features (fp32 and fp16) score like host features."""
    import pycuda.gpuarray as gpuarray

    rng = np.random.default_rng(5)
    g = make_gallery(rng, [(12, 12, 48), (6, 6, 96)], 64, 7, size=48)
    f = random_features(rng, g.contract, 3)
    m = cm.CudaMatcher(g, k_image=2, k_gallery=3)
    try:
        host = m.score(f)
        for dt, np_dt in (("float32", np.float32), ("float16", np.float16)):
            bufs = [gpuarray.to_gpu(np.ascontiguousarray(a, dtype=np_dt)) for a in f.levels]
            pooled = gpuarray.to_gpu(np.ascontiguousarray(f.pooled, dtype=np_dt))
            dev = Features(
                levels=[b.gpudata for b in bufs],
                pooled=pooled.gpudata,
                batch=3,
                device=True,
                dtypes=(dt,) * (len(bufs) + 1),
            )
            got = m.score(dev)
            if dt == "float32":
                for a, b in zip(got, host, strict=True):  # same kernels, same data: identical
                    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
                    np.testing.assert_array_equal(a.neighbors, b.neighbors)
                    assert a.image_score == b.image_score
            else:
                f16 = Features(
                    levels=[a.astype(np.float16).astype(np.float32) for a in f.levels],
                    pooled=f.pooled.astype(np.float16).astype(np.float32),
                    batch=3,
                )
                assert_matches(got, NumpyMatcher(g, k_image=2, k_gallery=3).score(f16))
    finally:
        m.close()


@pytest.mark.gpu
def test_no_device_allocation_per_image(drv, monkeypatch) -> None:
    rng = np.random.default_rng(6)
    g = make_gallery(rng, [(28, 28, 64), (14, 14, 128)], 128, 10, size=64)
    f = random_features(rng, g.contract, 2)
    m = cm.CudaMatcher(g, k_image=5, k_gallery=5)
    try:
        m.score(f)  # warm-up
        calls = []
        real = drv.mem_alloc
        monkeypatch.setattr(drv, "mem_alloc", lambda n: calls.append(n) or real(n))
        m._ctx.push()
        free_before = drv.mem_get_info()[0]
        drv.Context.pop()
        for _ in range(25):
            m.score(f)
        m._ctx.push()
        free_after = drv.mem_get_info()[0]
        drv.Context.pop()
        assert calls == []
        assert free_after == free_before
    finally:
        m.close()


@pytest.mark.gpu
def test_gallery_that_does_not_fit_is_refused(drv, monkeypatch) -> None:
    rng = np.random.default_rng(7)
    g = make_gallery(rng, [(8, 8, 32)], 32, 4)
    monkeypatch.setattr(drv, "mem_get_info", lambda: (1 << 20, 1 << 30))
    with pytest.raises(CompatibilityError, match="MiB"):
        cm.CudaMatcher(g, k_image=2, k_gallery=2)


def _real_model() -> Path | None:
    for p in (ROOT / "artifacts" / "lite0.onnx", ROOT / ".device" / "lite0.onnx"):
        if p.is_file():
            return p
    return None


@pytest.mark.gpu
@pytest.mark.slow
def test_real_bottle_features(drv, bottle_dir, tmp_path) -> None:
    """Lite0 features of real bottle images: same neighbours and maps as the oracle, K=5 and 50."""
    model = _real_model()
    if model is None:
        pytest.skip("no Lite0 ONNX (artifacts/lite0.onnx or .device/lite0.onnx)")
    from spade_edge.runtime.gallery import Gallery
    from spade_edge.runtime.packer import pack
    from spade_edge.runtime.preprocess import prepare_path
    from spade_edge.runtime.runners.ort import OrtRunner

    train = sorted((bottle_dir / "train" / "good").glob("*.png"))[:60]
    out = tmp_path / "bottle.gallery"
    pack(model, train, out, progress=False)
    g = Gallery.open(out)
    runner = OrtRunner(model)
    tests = sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:2]
    tests += sorted((bottle_dir / "test" / "good").glob("*.png"))[:2]
    batch = np.stack([prepare_path(p, runner.contract).tensor for p in tests])
    f = runner.infer(batch)
    for k in (5, 50):
        got, want = run_both(g, f, k_image=k, k_gallery=k)
        assert_matches(got, want)


# ----------------------------------------------------------------------------- emulated device
# A stand-in for pycuda whose kernels are NumPy versions of the .cu semantics, over a fake device
# memory that checks every access against its allocation. It runs CudaMatcher's host side (plan,
# upload, pointer arithmetic, launch arguments, output layout, allocation discipline) in CI,
# where there is no GPU; the kernels themselves are checked by the GPU tests above.
class _FakeMemory:
    def __init__(self) -> None:
        self.blocks: dict[int, np.ndarray] = {}
        self.next = 1 << 20
        self.allocs = 0

    def alloc(self, n: int) -> int:
        base, self.next = self.next, self.next + (n + 511) // 256 * 256
        self.blocks[base] = np.zeros(n, dtype=np.uint8)
        self.allocs += 1
        return base

    def view(self, ptr: int, dtype, count: int) -> np.ndarray:
        nbytes = np.dtype(dtype).itemsize * count
        for base, buf in self.blocks.items():
            if base <= ptr < base + len(buf):
                off = ptr - base
                assert off + nbytes <= len(buf), "device access out of bounds"
                assert off % np.dtype(dtype).itemsize == 0, "misaligned device access"
                return buf[off : off + nbytes].view(dtype)
        raise AssertionError(f"invalid device pointer {ptr:#x}")


def _fake_pycuda(mem: _FakeMemory):
    import types

    from spade_edge.runtime.scoring import upsample_bilinear

    class Alloc:
        def __init__(self, n: int) -> None:
            self.ptr = mem.alloc(n)

        def __int__(self) -> int:
            return self.ptr

        def free(self) -> None:
            mem.blocks.pop(self.ptr, None)

    def htod(dst, src, stream=None):
        b = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
        mem.view(int(dst), np.uint8, b.size)[:] = b

    def dtoh(dst, src, stream=None):
        b = dst.view(np.uint8).reshape(-1)
        b[:] = mem.view(int(src), np.uint8, b.size)

    def pooled_dist(grid, smem, q, half, cg, g, gn, n, dist):
        qv = mem.view(q, np.float16 if half else np.float32, cg).astype(np.float64)
        gv = mem.view(g, np.float16, n * cg).reshape(n, cg).astype(np.float64)
        d = qv @ qv + mem.view(gn, np.float64, n) - 2 * (gv @ qv)
        mem.view(dist, np.float64, n)[:] = np.maximum(d, 0)

    def topk(grid, smem, dist, n, npad, k_image, kmax, nbr, score):
        assert npad >= n and smem >= npad * 12
        d = mem.view(dist, np.float64, n)
        order = np.argsort(d, kind="stable")
        mem.view(nbr, np.int32, kmax)[:] = order[:kmax]
        mem.view(score, np.float32, 1)[0] = np.sqrt(d[order[:k_image]]).mean()

    def prep(grid, smem, src, half, p, c, cp, dst, qn, minbuf):
        x = mem.view(src, np.float16 if half else np.float32, p * c).reshape(p, c)
        h = np.zeros((p, cp), np.float16)
        h[:, :c] = x
        mem.view(dst, np.float16, p * cp)[:] = h.reshape(-1)
        mem.view(qn, np.float32, p)[:] = (h.astype(np.float32) ** 2).sum(1)
        mem.view(minbuf, np.uint32, p)[:] = 0x7F800000

    def knn(bm):
        def run(grid, smem, q, qn, nq, g, gn, idx, p, k, cp, tps, out):
            assert grid[0] * bm >= nq and smem == cm.fused_smem_bytes(bm, cp)
            tiles = -(-(p * k) // cm.BN)
            assert grid[1] * tps >= tiles > (grid[1] - 1) * tps
            ids = mem.view(idx, np.int32, k).astype(np.int64)
            rows = (ids[:, None] * p + np.arange(p)).reshape(-1)
            n_rows = int(ids.max() + 1) * p
            gv = mem.view(g, np.float16, n_rows * cp).reshape(n_rows, cp)[rows]
            qv = mem.view(q, np.float16, nq * cp).reshape(nq, cp).astype(np.float32)
            d = mem.view(gn, np.float32, n_rows)[rows][None] - 2 * qv @ gv.astype(np.float32).T
            best = np.maximum(d.min(1) + mem.view(qn, np.float32, nq), 0).astype(np.float32)
            o = mem.view(out, np.uint32, nq)
            o[:] = np.minimum(o, best.view(np.uint32))

        return run

    def upsample(grid, smem, minbuf, table, n_levels, s, out):
        acc = np.zeros((s, s), np.float32)
        for off, h, w in mem.view(table, np.int32, 3 * n_levels).reshape(-1, 3):
            m = mem.view(minbuf + int(off) * 4, np.float32, int(h * w)).reshape(h, w)
            acc += upsample_bilinear(np.sqrt(m), s)
        mem.view(out, np.float32, s * s)[:] = (acc / n_levels).reshape(-1)

    def blur(grid, smem, src, dst, s, w, r, along_y):
        x = mem.view(src, np.float32, s * s).reshape(s, s)
        wv = mem.view(w, np.float32, 2 * r + 1).astype(np.float64)
        y = correlate1d(x.astype(np.float64), wv, axis=0 if along_y else 1, mode="reflect")
        mem.view(dst, np.float32, s * s)[:] = y.reshape(-1)

    kernels = {
        "pooled_dist": (pooled_dist, "PiiPPiP"),
        "topk_select": (topk, "PiiiiPP"),
        "prep_query": (prep, "PiiiiPPP"),
        "upsample_mean": (upsample, "PPiiP"),
        "blur_pass": (blur, "PPiPii"),
    } | {f"knn_min_bm{b}": (knn(b), "PPiPPPiiiiP") for b in cm.BM_CHOICES}

    class Function:
        def __init__(self, name: str) -> None:
            self.impl, self.sig = kernels[name]
            self.limit = 48 * 1024

        def prepare(self, fmt: str) -> None:
            assert fmt == self.sig

        def set_attribute(self, attr, value) -> None:
            self.limit = value

        def get_attribute(self, attr) -> int:
            return 128

        def prepared_async_call(self, grid, block, stream, *args, shared_size=0):
            assert len(args) == len(self.sig) and shared_size <= self.limit
            assert all(isinstance(a, int) for a in args)
            self.impl(grid, shared_size, *args)

    class SourceModule:
        def __init__(self, source, options=None, no_extern_c=False, arch=None, cache_dir=None):
            self.source = source

        def get_function(self, name: str) -> Function:
            assert name in self.source or name.startswith("knn_min_bm")
            return Function(name)

    class Context:
        stack: list = []  # noqa: RUF012

        def push(self) -> None:
            Context.stack.append(self)

        @staticmethod
        def pop() -> None:
            Context.stack.pop()

        @staticmethod
        def get_current():
            return None

        @staticmethod
        def get_device():
            assert Context.stack, "no current context"
            return Device(0)

    attrs = {
        "MULTIPROCESSOR_COUNT": 132,
        "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN": 232448,
        "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR": 233472,
        "MAX_REGISTERS_PER_MULTIPROCESSOR": 65536,
    }

    class Device:
        def __init__(self, i: int) -> None:
            pass

        count = staticmethod(lambda: 1)
        name = staticmethod(lambda: "emulated sm_90")
        compute_capability = staticmethod(lambda: (9, 0))
        get_attribute = staticmethod(lambda a: attrs[a])
        retain_primary_context = staticmethod(Context)

    class Names:
        def __getattr__(self, name: str) -> str:
            return name

    drv = types.SimpleNamespace(
        init=lambda: None,
        Error=RuntimeError,
        MemoryError=MemoryError,
        Device=Device,
        Context=Context,
        device_attribute=Names(),
        function_attribute=Names(),
        mem_alloc=Alloc,
        mem_get_info=lambda: (64 << 30, 141 << 30),
        memcpy_htod=htod,
        memcpy_htod_async=htod,
        memcpy_dtoh_async=dtoh,
        pagelocked_empty=lambda n, dtype: np.zeros(n, dtype),
        Stream=lambda: types.SimpleNamespace(synchronize=lambda: None),
        Event=lambda: types.SimpleNamespace(record=lambda s=None: None, time_since=lambda e: 0.0),
    )
    compiler = types.SimpleNamespace(SourceModule=SourceModule)
    return types.SimpleNamespace(driver=drv, compiler=compiler), drv, Alloc


def test_host_side_on_emulated_device(monkeypatch) -> None:
    """Plan, upload, launches and output decoding, against the oracle, on an emulated GPU."""
    import sys

    mem = _FakeMemory()
    pkg, drv, alloc = _fake_pycuda(mem)
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)
    monkeypatch.setitem(sys.modules, "pycuda.compiler", pkg.compiler)
    rng = np.random.default_rng(8)
    g = make_gallery(rng, [(9, 7, 40), (13, 11, 72), (5, 3, 136)], 48, 9, size=40)
    f = random_features(rng, g.contract, 2)
    want = NumpyMatcher(g, k_image=3, k_gallery=4).score(f)
    m = cm.CudaMatcher(g, k_image=3, k_gallery=4)
    assert_matches(m.score(f), want)
    # device features (fp32) give the same result, and scoring allocates nothing
    bufs = []
    for a in [*f.levels, f.pooled]:
        bufs.append(alloc(a.nbytes))
        drv.memcpy_htod(bufs[-1], a)
    dev = Features(levels=bufs[:-1], pooled=bufs[-1], batch=2, device=True, dtypes=("float32",))
    n_allocs = mem.allocs
    assert_matches(m.score(dev), want)
    for bm in cm.BM_CHOICES:
        m.set_block_rows(bm)
        assert_matches(m.score(f), want)
    assert mem.allocs == n_allocs
    m.close()
    assert len(mem.blocks) == len(bufs)  # close() freed every matcher buffer
