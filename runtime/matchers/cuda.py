"""CUDA matcher (pycuda): the whole SPADE matching stage on the GPU, one D2H copy per image.

Why a hand-written kernel rather than cuBLAS + a min pass: the per-level work is a GEMM whose
only consumer is a row minimum, so the fused kernel (kernels/knn_level.cu) keeps the minimum in
registers and never writes the Q x (K*P) distance matrix, which at K=50 on wrn50 layer1 would be
2 GB per image. Everything else (pooled kNN, top-K, sqrt, upsample, level mean, blur) is small
and also stays on the device, so an image costs one host->device copy (or none, for TensorRT's
device features) and one device->host copy of ``[map | score | neighbours]``.

Memory: the gallery is uploaded once (fp16 channels-last, channels zero-padded to a multiple of
64; fp32 norms; fp64 pooled norms) and every workspace is allocated in ``__init__``; ``score``
allocates no device memory. A gallery that does not fit in free device memory is refused with
:class:`CompatibilityError` naming the sizes (no silent chunking).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spade_edge.runtime.contract import Contract
from spade_edge.runtime.errors import (
    BackendUnavailableError,
    CompatibilityError,
    ConfigError,
    FormatError,
    InputError,
)
from spade_edge.runtime.gpu import CudaDevice, import_pycuda, import_source_module
from spade_edge.runtime.matchers.base import GalleryArrays, KnnMatcher, KnnOptions, Score
from spade_edge.runtime.runners.base import Features
from spade_edge.runtime.scoring import GAUSSIAN_TRUNCATE

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+
    from typing_extensions import Unpack

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
KERNEL_FILES = ("knn_level.cu", "pooled_topk.cu", "postprocess.cu")
NVCC_OPTIONS = ["-O3", "-std=c++17"]

#: Tile constants of kernels/knn_level.cu: defined here only and passed to the compiler with -D
#: (``kernel_options``), so the launch planning below and the kernel cannot drift apart.
BN, BK, STAGES, THREADS = 128, 64, 3, 256
TILE_DEFINES: dict[str, int] = {
    "KNN_BN": BN,
    "KNN_BK": BK,
    "KNN_STAGES": STAGES,
    "KNN_THREADS": THREADS,
}
BM_CHOICES = (128, 64, 32, 16)
#: top-K keeps (fp64 distance, int32 index) for every gallery image in one block's shared memory.
MAX_GALLERY_IMAGES = 8192
#: device memory left free beyond our own needs (kernels' modules, driver, other users)
RESERVE_BYTES = 64 << 20
UPLOAD_CHUNK_BYTES = 64 << 20


def kernel_options() -> list[str]:
    """Compiler options for the kernels: NVCC_OPTIONS plus the tile constants as -D flags."""
    return [*NVCC_OPTIONS, *(f"-D{k}={v}" for k, v in TILE_DEFINES.items())]


def padded_channels(c: int) -> int:
    """Channels rounded up to the kernel's BK (64): rows stay 128-byte aligned for swizzling."""
    return -(-c // BK) * BK


def fused_smem_bytes(bm: int, cp: int) -> int:
    """Dynamic shared memory of one fused-kernel CTA: resident query block, gallery ring, norms.

    The norm ring holds 2 tiles when a tile spans >= 2 channel chunks, else 4 (see the kernel).
    """
    ring = 2 if cp >= 2 * BK else 4
    return bm * cp * 2 + STAGES * BN * BK * 2 + ring * BN * 4


def choose_block_rows(n_query: int, cp: int, smem_optin: int) -> int:
    """Query rows per CTA: the largest choice whose shared memory fits one block.

    Why the largest: mma.sync operands come through ldmatrix, and shared-memory bandwidth, not
    occupancy, limits a warp tile of 16-32 rows; 64x32 warp tiles (BM=128) halve that traffic
    per MMA. Small levels do not get a block far taller than their positions.
    """
    cap = max(BM_CHOICES[-1], 1 << max(0, math.ceil(math.log2(max(n_query, 1)))))
    for bm in BM_CHOICES:
        if bm <= cap and fused_smem_bytes(bm, cp) <= smem_optin:
            return bm
    raise CompatibilityError(
        f"cuda matcher: a level with {cp} (padded) channels needs "
        f"{fused_smem_bytes(BM_CHOICES[-1], cp)} bytes of shared memory per block; "
        f"this GPU allows {smem_optin}"
    )


def choose_splits(row_blocks: int, tiles: int, slots: int, bm: int) -> tuple[int, int]:
    """Split the gallery tiles over CTAs: returns (splits, tiles_per_split).

    Minimises waves x (tiles per CTA + the CTA's one-off query-block load, in tile units), i.e.
    balances SM occupancy against per-CTA overhead; ties go to fewer splits (fewer atomics).
    """
    best: tuple[float, int] | None = None
    for s in range(1, tiles + 1):
        per = -(-tiles // s)
        if s > 1 and -(-tiles // (s - 1)) == per:
            continue  # same work per CTA as s - 1 splits, only more CTAs
        waves = -(-(row_blocks * s) // slots)
        cost = waves * (per + bm / BN)
        if best is None or cost < best[0] - 1e-9:
            best = (cost, s)
    s = best[1] if best else 1
    per = -(-tiles // s)
    return -(-tiles // per), per


def device_bytes(contract: Contract, n_images: int, kmax: int) -> int:
    """Device memory the matcher allocates for a gallery: checked against free memory up front.

    Gallery (fp16 levels padded to Cp, fp32 norms, fp16 pooled + fp64 norms) plus the per-image
    workspaces (query copies, staging, minima, two map buffers, the output record, the blur
    weights). wrn50 at N=1000: 2.84 GB, so K up to 50 fits a 16 GB card with room to spare.
    """
    n, cg, s = int(n_images), int(contract.pooled_dim), int(contract.image_size)
    total = n * cg * 2 + n * 8 + n * 8 + cg * 4  # pooled, its norms, distances, query
    for lv in contract.levels:
        p, c = lv.height * lv.width, lv.channels
        cp = padded_channels(c)
        total += n * p * cp * 2 + n * p * 4  # gallery level + norms
        total += p * cp * 2 + p * 4 + p * 4 + p * c * 4  # query fp16, norms, minima, staging
    total += 2 * s * s * 4 + (s * s + 1 + int(kmax)) * 4  # map buffers, output record
    return total + 4096  # level table, blur weights


def gaussian_weights(sigma: float, truncate: float = GAUSSIAN_TRUNCATE) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's 1-D kernel (order 0) as float32; [1.0] when sigma <= 0."""
    if sigma <= 0:
        return np.ones(1, dtype=np.float32)
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w: np.ndarray = np.exp(-0.5 / (float(sigma) ** 2) * x**2)
    out: np.ndarray = (w / w.sum()).astype(np.float32)
    return out


def import_driver() -> Any:
    """``pycuda.driver`` with at least one CUDA device, else BackendUnavailableError."""
    drv = import_pycuda("matcher backend 'cuda'")
    try:
        drv.init()
        if drv.Device.count() == 0:
            raise BackendUnavailableError("matcher backend 'cuda': no CUDA device found")
    except drv.Error as e:
        raise BackendUnavailableError(f"matcher backend 'cuda': CUDA unavailable: {e}") from None
    return drv


def cache_dir() -> Path:
    """Where compiled kernels are cached (``SPADE_CUDA_CACHE`` overrides)."""
    env = os.environ.get("SPADE_CUDA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spade_edge" / "cuda"


@dataclass
class _Level:
    name: str
    h: int
    w: int
    c: int
    cp: int
    p: int
    g: Any  # fp16 [N*P, Cp]
    gn: Any  # fp32 [N*P]
    q16: Any  # fp16 [P, Cp] (query workspace)
    qn: Any  # fp32 [P]
    min_off: int  # offset (elements) of this level's [P] minima in the shared minima buffer
    stage: Any  # fp32 [P*C] host-input staging (device)
    bm: int = 0
    splits: int = 1
    tiles_per_split: int = 1
    smem: int = 0
    fn: Any = None


@dataclass(frozen=True)
class _DeviceLimits:
    """What the launch planning reads from the device once."""

    cc: tuple[int, int]  # compute capability
    n_sm: int
    smem_optin: int  # shared memory one block may opt in to
    smem_sm: int  # shared memory per multiprocessor
    regs_sm: int  # registers per multiprocessor


@dataclass
class StageEvents:
    """CUDA events recorded on the stream around each stage of one image (``profile``)."""

    start: Any  # before the inputs are copied or read
    inputs_ready: Any  # host inputs uploaded
    pooled_done: Any  # pooled kNN + top-K
    prep_done: list[Any]  # per level: query converted to fp16 + norms
    fused_done: list[Any]  # per level: fused nearest-position kernel
    maps_done: Any  # upsample + level mean + blur
    copied_back: Any  # the one device->host copy

    @classmethod
    def create(cls, drv: Any, n_levels: int) -> StageEvents:
        return cls(
            start=drv.Event(),
            inputs_ready=drv.Event(),
            pooled_done=drv.Event(),
            prep_done=[drv.Event() for _ in range(n_levels)],
            fused_done=[drv.Event() for _ in range(n_levels)],
            maps_done=drv.Event(),
            copied_back=drv.Event(),
        )

    def stage_ms(self, level_names: Sequence[str]) -> dict[str, float]:
        """Milliseconds per stage (events must have completed: after a synchronize)."""
        t = {
            "h2d": self.inputs_ready.time_since(self.start),
            "pooled_knn_topk": self.pooled_done.time_since(self.inputs_ready),
        }
        prev = self.pooled_done
        for name, prep, fused in zip(level_names, self.prep_done, self.fused_done, strict=True):
            t[f"prep_{name}"] = prep.time_since(prev)
            t[f"fused_{name}"] = fused.time_since(prep)
            prev = fused
        t["upsample_mean_blur"] = self.maps_done.time_since(prev)
        t["d2h"] = self.copied_back.time_since(self.maps_done)
        t["matching"] = self.maps_done.time_since(self.inputs_ready)
        return {k: float(v) for k, v in t.items()}


class CudaMatcher(KnnMatcher):
    """SPADE kNN scoring on an NVIDIA GPU (pycuda). One stream; not thread-safe."""

    name = "cuda"
    thread_safe = False

    def __init__(
        self,
        gallery: GalleryArrays,
        *,
        device: int = 0,
        block_rows: int | None = None,
        **knn: Unpack[KnnOptions],
    ) -> None:
        """``block_rows`` forces the fused kernel's query rows per CTA where it fits (tests,
        benchmark); levels it does not fit keep the automatic choice."""
        if block_rows is not None and block_rows not in BM_CHOICES:
            raise ConfigError(f"block_rows must be one of {BM_CHOICES}, got {block_rows!r}")
        self._block_rows = block_rows
        drv = import_driver()
        self._drv = drv
        self._allocs: list[Any] = []
        self.profile = False
        self.stage_ms: dict[str, float] = {}
        src = str(getattr(gallery, "path", "gallery"))
        self._src = src
        super().__init__(gallery, **knn)
        n = self.n_images
        if n > MAX_GALLERY_IMAGES:
            raise ConfigError(
                f"{src}: gallery has {n} images; the cuda matcher supports at most "
                f"{MAX_GALLERY_IMAGES} (use the numpy matcher)"
            )
        self._check_gallery(gallery, src)

        self._gpu = CudaDevice.current_or_open(drv, device)
        try:
            with self._gpu.active():
                self._setup(gallery, src)
        except BaseException:
            with contextlib.suppress(Exception), self._gpu.active():
                self._free()
            self._gpu.release()
            raise

    # ------------------------------------------------------------------ setup
    def _check_gallery(self, g: GalleryArrays, src: str) -> None:
        c = g.contract
        n = g.n_images
        if len(g.levels) != len(c.levels) or len(g.level_sqnorms) != len(c.levels):
            raise FormatError(
                f"{src}: gallery has {len(g.levels)} level arrays, contract {len(c.levels)}"
            )
        if tuple(g.pooled.shape) != (n, c.pooled_dim) or tuple(g.pooled_sqnorms.shape) != (n,):
            raise FormatError(f"{src}: pooled arrays do not match [N={n}, {c.pooled_dim}]")
        for lv, a, s in zip(c.levels, g.levels, g.level_sqnorms, strict=True):
            want = (n, lv.height, lv.width, lv.channels)
            if tuple(a.shape) != want or tuple(s.shape) != want[:3]:
                raise FormatError(f"{src}: level {lv.name} arrays {tuple(a.shape)} != {want}")

    def _alloc(self, nbytes: int) -> Any:
        buf = self._drv.mem_alloc(max(int(nbytes), 16))
        self._allocs.append(buf)
        return buf

    def _setup(self, g: GalleryArrays, src: str) -> None:
        """Everything a score needs, in order: device limits, memory check, kernels, gallery
        upload, launch plans, workspaces, prepared kernels, profiling events."""
        self._hw = self._read_device()
        self._check_free_memory(src)
        knn_mod, pooled_mod, post_mod = self._compile(self._hw.cc)
        self._knn_mod = knn_mod
        self._stream = self._drv.Stream()
        try:
            self._upload_pooled(g)
            self._upload_levels(g)
            for L in self._levels:
                self._plan_level(L)
            self._allocate_outputs()
        except self._drv.MemoryError as e:
            raise CompatibilityError(
                f"{src}: out of device memory while uploading the gallery to "
                f"{self.device_name}: {e}"
            ) from None
        self._prepare_kernels(pooled_mod, post_mod)
        self._events = StageEvents.create(self._drv, len(self._levels))
        self._stream.synchronize()

    def _read_device(self) -> _DeviceLimits:
        """The current device's limits; refuses GPUs without tensor cores + cp.async."""
        drv = self._drv
        dev = drv.Context.get_device()
        self.device_name = dev.name()
        cc = dev.compute_capability()
        if cc < (8, 0):
            raise BackendUnavailableError(
                f"cuda matcher needs tensor cores with cp.async (compute capability >= 8.0); "
                f"{self.device_name} is {cc[0]}.{cc[1]}"
            )
        attr = drv.device_attribute
        return _DeviceLimits(
            cc=(int(cc[0]), int(cc[1])),
            n_sm=dev.get_attribute(attr.MULTIPROCESSOR_COUNT),
            smem_optin=dev.get_attribute(attr.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
            smem_sm=dev.get_attribute(attr.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR),
            regs_sm=dev.get_attribute(attr.MAX_REGISTERS_PER_MULTIPROCESSOR),
        )

    def _check_free_memory(self, src: str) -> None:
        """Refuse a gallery that does not fit before any big allocation (no silent chunking)."""
        need = device_bytes(self.contract, self.n_images, self.kmax)
        free, _total = self._drv.mem_get_info()
        if need + RESERVE_BYTES > free:
            raise CompatibilityError(
                f"{src}: the cuda matcher needs {need / 2**20:.0f} MiB on {self.device_name} "
                f"for this gallery ({self.n_images} images) but only {free / 2**20:.0f} MiB "
                "are free; use fewer gallery images, a larger GPU or the numpy matcher"
            )

    def _upload_pooled(self, g: GalleryArrays) -> None:
        """Pooled gallery: fp16 [N, Cg] + float64 norms of the fp16 values (as the oracle);
        the distance buffer and the query's pooled vector."""
        n = self.n_images
        self._g_pooled = self._upload(g.pooled, np.float16)
        pooled_sq = np.empty(n, dtype=np.float64)
        for i0 in range(0, n, 4096):
            blk = np.asarray(g.pooled[i0 : i0 + 4096], dtype=np.float64)
            pooled_sq[i0 : i0 + len(blk)] = np.einsum("ij,ij->i", blk, blk)
        self._gn_pooled = self._upload(pooled_sq, np.float64)
        self._dist = self._alloc(n * 8)
        self._q_pooled = self._alloc(self.contract.pooled_dim * 4)

    def _upload_levels(self, g: GalleryArrays) -> None:
        """Per level: the gallery (fp16, channels padded) and its norms, the query workspaces,
        and this level's slice of the one minima buffer that the upsample kernel reads."""
        n = self.n_images
        levels = self.contract.levels
        offsets = np.cumsum([0] + [lv.height * lv.width for lv in levels]).tolist()
        self._minbuf = self._alloc(offsets[-1] * 4)
        self._levels: list[_Level] = []
        for lv, off, ga, gs in zip(levels, offsets[:-1], g.levels, g.level_sqnorms, strict=True):
            p, c = lv.height * lv.width, lv.channels
            cp = padded_channels(c)
            self._levels.append(
                _Level(
                    name=lv.name,
                    h=lv.height,
                    w=lv.width,
                    c=c,
                    cp=cp,
                    p=p,
                    g=self._upload_level(ga, n, p, c, cp),
                    gn=self._upload(gs, np.float32),
                    q16=self._alloc(p * cp * 2),
                    qn=self._alloc(p * 4),
                    min_off=int(off),
                    stage=self._alloc(p * c * 4),
                )
            )

    def _allocate_outputs(self) -> None:
        """The map pipeline's inputs and buffers and the one output record
        ``[map S*S | score | neighbours kmax]`` with its page-locked host copy."""
        s = self.size
        table = np.array([[L.min_off, L.h, L.w] for L in self._levels], dtype=np.int32)
        self._table = self._upload(table.reshape(-1), np.int32)
        self._weights_host = gaussian_weights(self.sigma)
        self._weights = self._upload(self._weights_host, np.float32)
        self._tmp_a = self._alloc(s * s * 4)
        self._tmp_b = self._alloc(s * s * 4)
        n_out = s * s + 1 + self.kmax
        self._out = self._alloc(n_out * 4)
        self._out_host = self._drv.pagelocked_empty(n_out, dtype=np.float32)
        self._nbr_ptr = int(self._out) + (s * s + 1) * 4
        self._score_ptr = int(self._out) + s * s * 4

    def _prepare_kernels(self, pooled_mod: Any, post_mod: Any) -> None:
        """Look up and prepare the per-image kernels (the fused ones: ``_plan_level``)."""
        optin = self._hw.smem_optin
        n = self.n_images
        self._f_pooled = pooled_mod.get_function("pooled_dist")
        self._f_pooled.prepare("PiiPPiP")
        self._pooled_smem = self.contract.pooled_dim * 8 + 32 * 8
        self._set_smem(self._f_pooled, self._pooled_smem, optin, "pooled_dist")
        self._f_topk = pooled_mod.get_function("topk_select")
        self._f_topk.prepare("PiiiiPP")
        self._npad = 1 << max(1, math.ceil(math.log2(n)))
        self._topk_smem = self._npad * 12
        self._set_smem(self._f_topk, self._topk_smem, optin, "topk_select")
        self._f_prep = self._knn_mod.get_function("prep_query")
        self._f_prep.prepare("PiiiiPPP")
        self._f_up = post_mod.get_function("upsample_mean")
        self._f_up.prepare("PPiiP")
        self._f_blur = post_mod.get_function("blur_pass")
        self._f_blur.prepare("PPiPii")
        self._pooled_grid = (max(1, min(-(-n // 8), 4 * self._hw.n_sm)), 1)

    def _set_smem(self, fn: Any, nbytes: int, optin: int, what: str) -> None:
        if nbytes > optin:
            raise CompatibilityError(
                f"cuda matcher: {what} needs {nbytes} bytes of shared memory; "
                f"{self.device_name} allows {optin}"
            )
        if nbytes > 48 * 1024:
            fn.set_attribute(self._drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)

    def _plan_level(self, L: _Level) -> None:
        hw = self._hw
        forced = self._block_rows
        if forced is not None and fused_smem_bytes(forced, L.cp) <= hw.smem_optin:
            L.bm = forced
        else:  # automatic, or the forced variant does not fit this level on this GPU
            L.bm = choose_block_rows(L.p, L.cp, hw.smem_optin)
        L.smem = fused_smem_bytes(L.bm, L.cp)
        L.fn = self._knn_mod.get_function(f"knn_min_bm{L.bm}")
        L.fn.prepare("PPiPPPiiiiP")
        self._set_smem(L.fn, L.smem, hw.smem_optin, f"knn_min_bm{L.bm}")
        regs = max(1, L.fn.get_attribute(self._drv.function_attribute.NUM_REGS))
        per_sm = max(1, min(hw.smem_sm // (L.smem + 1024), hw.regs_sm // (regs * THREADS), 8))
        tiles = -(-(self.k_gallery * L.p) // BN)
        row_blocks = -(-L.p // L.bm)
        L.splits, L.tiles_per_split = choose_splits(row_blocks, tiles, hw.n_sm * per_sm, L.bm)

    def _compile(self, cc: tuple[int, int]) -> tuple[Any, Any, Any]:
        SourceModule = import_source_module("cuda matcher")
        cdir = cache_dir()
        cdir.mkdir(parents=True, exist_ok=True)
        arch = f"sm_{cc[0]}{cc[1]}"
        mods = []
        for fname in KERNEL_FILES:
            path = KERNEL_DIR / fname
            try:
                source = path.read_text()
            except OSError as e:
                raise FormatError(f"{path}: kernel source unreadable: {e}") from None
            try:
                mods.append(
                    SourceModule(
                        source,
                        options=kernel_options(),
                        no_extern_c=True,
                        arch=arch,
                        cache_dir=str(cdir),
                    )
                )
            except Exception as e:  # CompileError / missing nvcc / driver JIT errors
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise BackendUnavailableError(
                    f"{path}: cannot build the CUDA kernel for {arch} (nvcc on PATH?): {first}"
                ) from None
        return mods[0], mods[1], mods[2]

    def _upload(self, arr: Any, dtype: type) -> Any:
        """Copy an array (any shape) to a new device buffer, in bounded host chunks."""
        shape = tuple(arr.shape)
        n0 = shape[0] if shape else 1
        row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        item = np.dtype(dtype).itemsize
        buf = self._alloc(n0 * row * item)
        step = max(1, UPLOAD_CHUNK_BYTES // max(1, row * item))
        for i0 in range(0, n0, step):
            host: np.ndarray = np.ascontiguousarray(np.asarray(arr[i0 : i0 + step]), dtype=dtype)
            self._drv.memcpy_htod(int(buf) + i0 * row * item, host)
        return buf

    def _upload_level(self, arr: Any, n: int, p: int, c: int, cp: int) -> Any:
        """fp16 [N, H, W, C] -> device [N*P, Cp], channels zero-padded."""
        buf = self._alloc(n * p * cp * 2)
        step = max(1, UPLOAD_CHUNK_BYTES // (p * cp * 2))
        for i0 in range(0, n, step):
            host = np.asarray(arr[i0 : i0 + step], dtype=np.float16).reshape(-1, p, c)
            if cp != c:
                padded = np.zeros((len(host), p, cp), dtype=np.float16)
                padded[..., :c] = host
                host = padded
            self._drv.memcpy_htod(int(buf) + i0 * p * cp * 2, np.ascontiguousarray(host))
        return buf

    # ------------------------------------------------------------------ scoring
    def score(self, features: Features) -> list[Score]:
        """Score each image of the batch; device features (TensorRT) are read in place."""
        if self._closed:
            raise InputError("cuda matcher: score() after close()")
        with self._gpu.active():
            if features.device:
                dtypes = _device_dtypes(features.dtypes, len(features.levels))
                if len(features.levels) != len(self._levels):
                    raise InputError(
                        f"features have {len(features.levels)} levels, the gallery "
                        f"{len(self._levels)}"
                    )
                return [self._score_device(features, b, dtypes) for b in range(features.batch)]
            self._check_host(features)
            return [self._score_host(features, b) for b in range(features.batch)]

    def _check_host(self, f: Features) -> None:
        if len(f.levels) != len(self._levels):
            raise InputError(
                f"features have {len(f.levels)} levels, the gallery {len(self._levels)}"
            )
        for L, a in zip(self._levels, f.levels, strict=True):
            if a.ndim != 4 or tuple(a.shape[1:]) != (L.h, L.w, L.c) or a.shape[0] < f.batch:
                raise InputError(
                    f"level {L.name}: features {tuple(a.shape)} do not match the gallery "
                    f"[B, {L.h}, {L.w}, {L.c}]"
                )
        pooled = np.asarray(f.pooled)
        if pooled.shape[-1] != self.contract.pooled_dim or pooled.shape[0] < f.batch:
            raise InputError(
                f"pooled features {pooled.shape} do not match [B, {self.contract.pooled_dim}]"
            )

    def _score_host(self, f: Features, b: int) -> Score:
        drv = self._drv
        st = self._stream
        ev = self._events if self.profile else None
        if ev:
            ev.start.record(st)
        # Host features: fp32 (or fp16) uploaded to the per-level staging buffers.
        srcs = []
        for L, a in zip(self._levels, f.levels, strict=True):
            x = np.asarray(a[b])
            half = x.dtype == np.float16
            x = np.ascontiguousarray(x, dtype=np.float16 if half else np.float32)
            drv.memcpy_htod_async(L.stage, x, st)
            srcs.append((int(L.stage), int(half)))
        q = np.asarray(f.pooled[b])
        qhalf = q.dtype == np.float16
        q = np.ascontiguousarray(q.reshape(-1), dtype=np.float16 if qhalf else np.float32)
        drv.memcpy_htod_async(self._q_pooled, q, st)
        return self._run(srcs, (int(self._q_pooled), int(qhalf)), ev)

    def _score_device(self, f: Features, b: int, dtypes: list[str]) -> Score:
        ev = self._events if self.profile else None
        if ev:
            ev.start.record(self._stream)
        srcs = []
        for L, obj, dt in zip(self._levels, f.levels, dtypes[:-1], strict=True):
            es = 2 if dt == "float16" else 4
            srcs.append((int(obj) + b * L.p * L.c * es, int(dt == "float16")))
        es = 2 if dtypes[-1] == "float16" else 4
        qptr = int(f.pooled) + b * self.contract.pooled_dim * es
        return self._run(srcs, (qptr, int(dtypes[-1] == "float16")), ev)

    def _run(
        self, srcs: list[tuple[int, int]], pooled: tuple[int, int], ev: StageEvents | None
    ) -> Score:
        """Queue the whole matching stage on the stream, copy the result back once."""
        st = self._stream
        if ev:
            ev.inputs_ready.record(st)
        self._launch_pooled_topk(pooled)
        if ev:
            ev.pooled_done.record(st)
        for i, (L, src) in enumerate(zip(self._levels, srcs, strict=True)):
            self._launch_prep(L, src)
            if ev:
                ev.prep_done[i].record(st)
            self._launch_fused(L)
            if ev:
                ev.fused_done[i].record(st)
        self._launch_maps()
        if ev:
            ev.maps_done.record(st)
        self._drv.memcpy_dtoh_async(self._out_host, self._out, st)
        if ev:
            ev.copied_back.record(st)
        st.synchronize()
        if ev:
            self.stage_ms = ev.stage_ms([L.name for L in self._levels])
        return self._read_output()

    def _launch_pooled_topk(self, pooled: tuple[int, int]) -> None:
        """Image level: distances to every pooled gallery vector, then the top-K into the
        output record (score, neighbours)."""
        ptr, half = pooled
        n = self.n_images
        self._f_pooled.prepared_async_call(
            self._pooled_grid,
            (256, 1, 1),
            self._stream,
            ptr,
            half,
            self.contract.pooled_dim,
            int(self._g_pooled),
            int(self._gn_pooled),
            n,
            int(self._dist),
            shared_size=self._pooled_smem,
        )
        self._f_topk.prepared_async_call(
            (1, 1),
            (1024, 1, 1),
            self._stream,
            int(self._dist),
            n,
            self._npad,
            self.k_image,
            self.kmax,
            self._nbr_ptr,
            self._score_ptr,
            shared_size=self._topk_smem,
        )

    def _level_minima(self, L: _Level) -> int:
        """Device address of level ``L``'s [P] nearest-distance minima."""
        return int(self._minbuf) + L.min_off * 4

    def _launch_prep(self, L: _Level, src: tuple[int, int]) -> None:
        """Query features (fp32 or fp16 at ``src``) -> fp16 padded rows + norms; minima reset."""
        ptr, half = src
        self._f_prep.prepared_async_call(
            (-(-L.p // 8), 1),
            (256, 1, 1),
            self._stream,
            ptr,
            half,
            L.p,
            L.c,
            L.cp,
            int(L.q16),
            int(L.qn),
            self._level_minima(L),
        )

    def _launch_fused(self, L: _Level) -> None:
        """Nearest position among the K gallery images' positions, per query position."""
        L.fn.prepared_async_call(
            (-(-L.p // L.bm), L.splits),
            (THREADS, 1, 1),
            self._stream,
            int(L.q16),
            int(L.qn),
            L.p,
            int(L.g),
            int(L.gn),
            self._nbr_ptr,
            L.p,
            self.k_gallery,
            L.cp,
            L.tiles_per_split,
            self._level_minima(L),
            shared_size=L.smem,
        )

    def _launch_maps(self) -> None:
        """Upsample + level mean into a map, then the separable blur into the output record."""
        s, st = self.size, self._stream
        grid = (-(-s // 32), -(-s // 8))
        block = (32, 8, 1)
        radius = (len(self._weights_host) - 1) // 2
        weights, tmp_a, tmp_b = int(self._weights), int(self._tmp_a), int(self._tmp_b)
        minbuf = int(self._minbuf)
        self._f_up.prepared_async_call(
            grid, block, st, minbuf, int(self._table), len(self._levels), s, tmp_a
        )
        self._f_blur.prepared_async_call(grid, block, st, tmp_a, tmp_b, s, weights, radius, 1)
        self._f_blur.prepared_async_call(
            grid, block, st, tmp_b, int(self._out), s, weights, radius, 0
        )

    def _read_output(self) -> Score:
        """The host copy of the output record as a Score (the map copied out of the buffer)."""
        s = self.size
        out = self._out_host
        amap = out[: s * s].reshape(s, s).copy()
        score = float(out[s * s])
        nbrs = out[s * s + 1 : s * s + 1 + self.kmax].view(np.int32).astype(np.int64)
        return Score(score, amap, nbrs)

    def set_block_rows(self, block_rows: int | None) -> None:
        """Re-plan the fused kernels with forced query rows per CTA (None = automatic).

        For the benchmark's variant sweep and tests; the gallery stays on the device.
        """
        if block_rows is not None and block_rows not in BM_CHOICES:
            raise ConfigError(f"block_rows must be one of {BM_CHOICES}, got {block_rows!r}")
        self._block_rows = block_rows
        with self._gpu.active():
            for L in self._levels:
                self._plan_level(L)

    def plan(self) -> list[dict[str, int | str]]:
        """Launch plan per level (block rows, splits, shared memory): for logs and the bench."""
        return [
            {
                "level": L.name,
                "positions": L.p,
                "channels": L.c,
                "padded_channels": L.cp,
                "block_rows": L.bm,
                "splits": L.splits,
                "tiles_per_split": L.tiles_per_split,
                "smem_bytes": L.smem,
            }
            for L in self._levels
        ]

    # ------------------------------------------------------------------ teardown
    def _free(self) -> None:
        for buf in self._allocs:
            with contextlib.suppress(Exception):  # already freed / context gone at exit
                buf.free()
        self._allocs = []

    def close(self) -> None:
        """Free every device buffer (the gallery included)."""
        if self._closed:
            return
        self._closed = True
        with self._gpu.active():
            self._stream.synchronize()
            self._free()
        self._gpu.release()


def _device_dtypes(dtypes: Sequence[str], n_levels: int) -> list[str]:
    """Per-output dtypes (levels..., pooled) from Features.dtypes: one entry each, one for all,
    or none (float32)."""
    d = [str(x) for x in dtypes] or ["float32"]
    if len(d) == 1:
        d = d * (n_levels + 1)
    if len(d) != n_levels + 1:
        raise InputError(
            f"device features carry {len(d)} dtypes; expected {n_levels + 1} (levels, pooled)"
        )
    bad = [x for x in d if x not in ("float32", "float16")]
    if bad:
        raise InputError(f"device features dtype {bad[0]!r} not supported (float32 or float16)")
    return d
