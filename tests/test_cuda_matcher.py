"""CUDA matcher: agrees with the NumPy oracle, reads device features, allocates nothing per image.

Each matcher test runs on a real GPU through pycuda (marker ``gpu``; skips with a reason without
pycuda or a device) and on the SIMT emulator (marker ``simt``; the emulator in tools/ runs the .cu
kernels on the CPU behind a pycuda stand-in). The planning helpers (block rows, splits, blur
weights) are checked on any machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.ndimage import correlate1d, gaussian_filter1d

from spade_edge.runtime import synthetic
from spade_edge.runtime.errors import BackendUnavailableError, CompatibilityError, ConfigError
from spade_edge.runtime.gallery import InMemoryGallery
from spade_edge.runtime.matchers import cuda as cm
from spade_edge.runtime.matchers.numpy_matcher import NumpyMatcher
from spade_edge.runtime.runners.base import Features
from spade_edge_testing import fake_pycuda, simt_device
from spade_edge_testing.matching import (
    assert_matches,
    make_contract,
    make_gallery,
    random_features,
)

ROOT = Path(__file__).resolve().parents[1]


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


def test_wrn50_k50_n1000_fits_a_16gb_card() -> None:
    """The issue's sizing: 1,000 wrn50 images at K=50 within 16 GB (with the reserve)."""
    c = make_contract([(56, 56, 256), (28, 28, 512), (14, 14, 1024)], 2048, 224)
    need = cm.device_bytes(c, 1000, 50)
    assert 2.5e9 < need < 3.5e9  # ~2.83 MB of fp16 features per image, channels already /64
    assert need + cm.RESERVE_BYTES < 16 * 10**9


@pytest.mark.simt
def test_memory_estimate_is_what_the_matcher_allocates(simt_lib, monkeypatch) -> None:
    """device_bytes (the up-front check) covers every allocation, and not much more."""
    env = simt_env(simt_lib, monkeypatch)
    rng = np.random.default_rng(14)
    g = make_gallery(rng, [(9, 7, 40), (13, 11, 72), (5, 3, 136)], 48, 9, size=40)
    m = cm.CudaMatcher(g, k_image=3, k_gallery=4)
    try:
        used = fake_pycuda.TOTAL_MEMORY - env.drv.mem_get_info()[0]
        est = cm.device_bytes(g.contract, 9, 4)
        assert used <= est <= used + 8192
    finally:
        m.close()


def test_backend_unavailable_without_pycuda() -> None:
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        g = make_gallery(np.random.default_rng(0), [(4, 4, 8)], 8, 3)
        with pytest.raises(BackendUnavailableError, match="pycuda"):
            cm.CudaMatcher(g)
    else:
        pytest.skip("pycuda is installed here")


# ----------------------------------------------------------------------------- devices
# Every test below runs twice: on a real GPU through pycuda (marker ``gpu``; skips without one)
# and on the SIMT emulator (spade_edge_testing), which executes the same .cu kernels and the
# matcher's own host code on the CPU, so CI checks the kernels' logic against the oracle, no GPU.
@dataclass
class GpuEnv:
    kind: str  # "pycuda" or "simt"
    drv: Any
    to_device: Callable[[np.ndarray], Any]  # host array -> device buffer (int() = pointer)
    emulator: Any = None


@pytest.fixture(scope="session")
def simt_lib(request: pytest.FixtureRequest) -> Path:
    return simt_device.session_library(request)


def _pycuda_env() -> GpuEnv:
    try:
        import pycuda.driver as drv
        import pycuda.gpuarray as gpuarray
    except Exception as e:
        pytest.skip(f"pycuda not importable: {e}")
    try:
        drv.init()
        if drv.Device.count() == 0:
            pytest.skip("no CUDA device")
    except Exception as e:
        pytest.skip(f"CUDA unavailable: {e}")
    keep: list[Any] = []

    def to_device(a: np.ndarray) -> Any:
        c = drv.Device(0).retain_primary_context()
        c.push()
        try:
            g = gpuarray.to_gpu(np.ascontiguousarray(a))
        finally:
            drv.Context.pop()
        keep.append(g)
        return g.gpudata

    return GpuEnv("pycuda", drv, to_device)


def simt_env(simt_lib: Path, monkeypatch: pytest.MonkeyPatch, target: str = "sm_90") -> GpuEnv:
    pkg = fake_pycuda.install_emulator(simt_lib, target, monkeypatch.setitem)

    def to_device(a: np.ndarray) -> Any:
        a = np.ascontiguousarray(a)
        pkg.driver.Device(0).retain_primary_context().push()  # as on a GPU: a context is needed
        try:
            buf = pkg.driver.mem_alloc(a.nbytes)
            pkg.driver.memcpy_htod(buf, a)
        finally:
            pkg.driver.Context.pop()
        return buf

    return GpuEnv("simt", pkg.driver, to_device, pkg.device)


DEVICES = [
    pytest.param("pycuda", marks=pytest.mark.gpu),
    pytest.param("simt", marks=pytest.mark.simt),
]


@pytest.fixture(params=DEVICES)
def gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> GpuEnv:
    if request.param == "pycuda":
        return _pycuda_env()
    return simt_env(request.getfixturevalue("simt_lib"), monkeypatch)


def run_both(g, feats: Features, **kw):
    want = NumpyMatcher(g, **{k: v for k, v in kw.items() if k != "block_rows"}).score(feats)
    m = cm.CudaMatcher(g, **kw)
    try:
        got = m.score(feats)
    finally:
        m.close()
    return got, want


def test_random_odd_sizes(gpu: GpuEnv) -> None:
    """Positions and channels that are not multiples of the tiles; batch of 2."""
    rng = np.random.default_rng(1)
    g = make_gallery(rng, [(9, 7, 40), (13, 11, 72), (5, 3, 136)], 48, 9, size=40)
    f = random_features(rng, g.contract, 2)
    got, want = run_both(g, f, k_image=3, k_gallery=4)
    assert_matches(got, want)


@pytest.mark.parametrize("block_rows", [None, 128, 64, 32, 16])
def test_wrn50_like_every_block_variant(gpu: GpuEnv, block_rows) -> None:
    """wrn50's channel counts (256/512 + an odd level) with each fused-kernel variant; full
    wrn50 layer1/2 sizes on a GPU, fewer positions on the emulator."""
    rng = np.random.default_rng(2)
    if gpu.kind == "pycuda":
        shapes = [(56, 56, 256), (28, 28, 512), (13, 11, 200)]
    else:
        shapes = [(17, 15, 256), (9, 10, 512), (13, 11, 200)]
    g = make_gallery(rng, shapes, 256, 6, size=224 if gpu.kind == "pycuda" else 64)
    f = random_features(rng, g.contract, 1)
    try:
        got, want = run_both(g, f, k_image=3, k_gallery=5, block_rows=block_rows)
    except CompatibilityError as e:
        pytest.skip(f"variant does not fit this GPU: {e}")
    assert_matches(got, want)


@pytest.mark.simt
@pytest.mark.parametrize("target", ["sm_87", "sm_89", "sm_90"])
def test_emulated_targets_plan_and_match(simt_lib, monkeypatch, target: str) -> None:
    """Each target's shared-memory limit gives its own launch plan; every plan matches."""
    simt_env(simt_lib, monkeypatch, target)
    rng = np.random.default_rng(12)
    g = make_gallery(rng, [(11, 12, 256), (6, 6, 512), (3, 4, 1024)], 64, 5, size=48)
    f = random_features(rng, g.contract, 1)
    m = cm.CudaMatcher(g, k_image=2, k_gallery=4)
    try:
        plan = m.plan()
        optin = fake_pycuda.TARGETS[target][1]["MAX_SHARED_MEMORY_PER_BLOCK_OPTIN"]
        assert all(p["smem_bytes"] <= optin for p in plan)
        if target == "sm_89":  # ~99 KiB per block: 1024 channels only fit 16-row blocks
            assert plan[2]["block_rows"] == 16
        assert_matches(m.score(f), NumpyMatcher(g, k_image=2, k_gallery=4).score(f))
    finally:
        m.close()


def test_k1_and_k_equals_n(gpu: GpuEnv) -> None:
    rng = np.random.default_rng(3)
    g = make_gallery(rng, [(14, 14, 64), (7, 7, 128)], 64, 11, size=56)
    f = random_features(rng, g.contract, 2)
    for k in (1, 11):
        got, want = run_both(g, f, k_image=k, k_gallery=k)
        assert_matches(got, want)
    with pytest.raises(ConfigError):
        cm.CudaMatcher(g, k_image=12)


def test_k50(gpu: GpuEnv) -> None:
    """K=50 (the paper's largest) over a 57-image gallery."""
    rng = np.random.default_rng(13)
    g = make_gallery(rng, [(8, 8, 64), (4, 4, 160)], 96, 57, size=32)
    f = random_features(rng, g.contract, 1)
    got, want = run_both(g, f, k_image=50, k_gallery=50)
    assert_matches(got, want)


def test_ties_go_to_lower_index(gpu: GpuEnv) -> None:
    """Duplicated gallery images: equal distances rank by index, as a stable argsort."""
    rng = np.random.default_rng(4)
    shapes = [(8, 8, 32), (4, 4, 64)]
    base = make_gallery(rng, shapes, 32, 8)
    order = [0, 5, 1, 5, 2, 2, 3, 5]  # copies of 5 at 1, 3, 7 and of 2 at 4, 5
    g = InMemoryGallery.from_features(
        base.contract, [a[order] for a in base.levels], base.pooled[order]
    )
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


def test_device_pointer_input(gpu: GpuEnv) -> None:
    """TensorRT-style device features (fp32 and fp16) score like host features."""
    rng = np.random.default_rng(5)
    g = make_gallery(rng, [(12, 12, 48), (6, 6, 96)], 64, 7, size=48)
    f = random_features(rng, g.contract, 3)
    m = cm.CudaMatcher(g, k_image=2, k_gallery=3)
    try:
        host = m.score(f)
        for dt, np_dt in (("float32", np.float32), ("float16", np.float16)):
            bufs = [gpu.to_device(a.astype(np_dt)) for a in f.levels]
            pooled = gpu.to_device(f.pooled.astype(np_dt))
            dev = Features(
                levels=bufs, pooled=pooled, batch=3, device=True, dtypes=(dt,) * (len(bufs) + 1)
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


def test_no_device_allocation_per_image(gpu: GpuEnv, monkeypatch) -> None:
    rng = np.random.default_rng(6)
    g = make_gallery(rng, [(28, 28, 64), (14, 14, 128)], 128, 10, size=64)
    f = random_features(rng, g.contract, 2)
    m = cm.CudaMatcher(g, k_image=5, k_gallery=5)
    drv = gpu.drv
    try:
        m.score(f)  # warm-up
        calls = []
        real = drv.mem_alloc
        monkeypatch.setattr(drv, "mem_alloc", lambda n: calls.append(n) or real(n))
        with m._gpu.active():
            free_before = drv.mem_get_info()[0]
        for _ in range(25 if gpu.kind == "pycuda" else 3):
            m.score(f)
        with m._gpu.active():
            free_after = drv.mem_get_info()[0]
        assert calls == []
        assert free_after == free_before
    finally:
        m.close()
    if gpu.emulator is not None:  # close() returned every byte
        assert drv.mem_get_info()[0] == fake_pycuda.TOTAL_MEMORY


def test_gallery_that_does_not_fit_is_refused(gpu: GpuEnv, monkeypatch) -> None:
    rng = np.random.default_rng(7)
    g = make_gallery(rng, [(8, 8, 32)], 32, 4)
    monkeypatch.setattr(gpu.drv, "mem_get_info", lambda: (1 << 20, 1 << 30))
    with pytest.raises(CompatibilityError, match="MiB"):
        cm.CudaMatcher(g, k_image=2, k_gallery=2)


def _real_model() -> Path | None:
    for p in (ROOT / "artifacts" / "lite0.onnx", ROOT / ".device" / "lite0.onnx"):
        if p.is_file():
            return p
    return None


@pytest.mark.slow
def test_real_bottle_features(gpu: GpuEnv, request, tmp_path) -> None:
    """Lite0 features of real bottle images: same neighbours and maps as the oracle.

    On a GPU: 4 images, K=5 and 50. On the emulator (~15 s per image at K=5): 2 images, K=5.
    """
    bottle_dir = request.getfixturevalue("bottle_dir")  # after the device check: skips are cheap
    model = _real_model() or request.getfixturevalue("lite0_onnx")
    from spade_edge.runtime.gallery import Gallery
    from spade_edge.runtime.packer import pack
    from spade_edge.runtime.preprocess import prepare_path
    from spade_edge.runtime.runners.ort import OrtRunner

    real = gpu.kind == "pycuda"
    train = sorted((bottle_dir / "train" / "good").glob("*.png"))[:60]
    out = tmp_path / "bottle.gallery"
    pack(model, train, out, progress=False, far=0)
    g = Gallery.open(out)
    runner = OrtRunner(model)
    tests = sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[: 2 if real else 1]
    tests += sorted((bottle_dir / "test" / "good").glob("*.png"))[: 2 if real else 1]
    batch = np.stack([prepare_path(p, runner.contract).tensor for p in tests])
    f = runner.infer(batch)
    for k in (5, 50) if real else (5,):
        got, want = run_both(g, f, k_image=k, k_gallery=k)
        assert_matches(got, want)


# ----------------------------------------------------------------------------- emulator itself
@pytest.mark.simt
def test_emulator_refuses_an_undersized_shared_memory_launch(simt_lib) -> None:
    """The emulator is a checker: a launch whose tiles overrun shared memory is an error."""
    dev = simt_device.Device(simt_lib)
    cp, nq, p = 64, 20, 30
    q = dev.upload(np.zeros((nq, cp), np.float16))
    qn = dev.upload(np.zeros(nq, np.float32))
    g = dev.upload(np.zeros((p, cp), np.float16))
    gn = dev.upload(np.zeros(p, np.float32))
    idx = dev.upload(np.zeros(1, np.int32))
    out = dev.upload(np.full(nq, 0x7F800000, np.uint32))
    args = (q, qn, nq, g, gn, idx, p, 1, cp, 1, out)
    with pytest.raises(simt_device.SimtError, match="shared"):
        dev.launch("knn_min_bm32", (1, 1), (256,), "PPiPPPiiiiP", *args, shared=16 * 1024)
    dev.launch(
        "knn_min_bm32", (1, 1), (256,), "PPiPPPiiiiP", *args, shared=cm.fused_smem_bytes(32, cp)
    )


def test_profile_times_every_named_stage(gpu: GpuEnv) -> None:
    """profile=True records one event per stage (StageEvents) and names every stage's time."""
    rng = np.random.default_rng(21)
    g = make_gallery(rng, [(6, 5, 40), (3, 3, 72)], 48, 6, size=32)
    f = random_features(rng, g.contract, 1)
    with cm.CudaMatcher(g, k_image=2, k_gallery=3) as m:
        m.profile = True
        got = m.score(f)
        assert set(m.stage_ms) == {
            "h2d",
            "pooled_knn_topk",
            "prep_l0",
            "fused_l0",
            "prep_l1",
            "fused_l1",
            "upsample_mean_blur",
            "d2h",
            "matching",
        }
        assert all(isinstance(v, float) and v >= 0.0 for v in m.stage_ms.values())
    assert_matches(got, NumpyMatcher(g, k_image=2, k_gallery=3).score(f))


def test_tiled_random_gallery_as_the_benchmark_builds_it(gpu: GpuEnv) -> None:
    """cuda_bench's gallery (runtime.synthetic, few images repeated lazily) uploads and scores
    like the same rows held in memory."""
    c = make_contract([(6, 6, 40), (3, 3, 72)], 48, 32)
    tiled = synthetic.random_gallery(c, 12, rng=9, features="relu", distinct=4)
    rows = InMemoryGallery(
        c,
        12,
        tiled.pooled[0:12],
        tiled.pooled_sqnorms[0:12],
        [a[0:12] for a in tiled.levels],
        [a[0:12] for a in tiled.level_sqnorms],
    )
    f = random_features(np.random.default_rng(10), c, 1)
    with cm.CudaMatcher(tiled, k_image=3, k_gallery=5) as m:
        got = m.score(f)
    assert_matches(got, NumpyMatcher(rows, k_image=3, k_gallery=5).score(f))
