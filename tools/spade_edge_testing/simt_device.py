"""The SIMT emulator (``simt/``) from Python: build it, allocate "device" memory, launch kernels.

Device memory is host memory (:class:`DeviceMemory`): each allocation is a NumPy buffer,
256-byte aligned like cudaMalloc, followed by a guard band that is checked after every launch,
so a kernel that writes past its buffers fails the test that launched it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.matchers.cuda import KERNEL_DIR, TILE_DEFINES

SIMT_DIR = Path(__file__).resolve().parent / "simt"
SOURCES = (
    SIMT_DIR / "simt.h",
    SIMT_DIR / "simt_kernels.cpp",
    SIMT_DIR / "include" / "cuda_fp16.h",
    *sorted(KERNEL_DIR.glob("*.cu")),
)
#: where scripts build the emulator: the checkout's pytest cache directory, where the tests
#: build it too (this package is installed editable from the checkout: ``pip install -e tools``)
DEFAULT_CACHE = Path(__file__).resolve().parents[2] / ".pytest_cache" / "d" / "simt"
GUARD = 256
GUARD_BYTE = 0xA5


class SimtError(AssertionError):
    """The emulator refused a launch (deadlock, bad shared-memory access, divergent collective)."""


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def build(cache: Path) -> Path:
    """Compile the emulator with the current kernel sources (cached by their hash)."""
    cxx = compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++) on PATH")
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        cxx,
        "-O2",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-fno-strict-aliasing",  # kernels pun registers (uint4 -> __half2), as CUDA code does
        "-DSPADE_SIMT",
        *(f"-D{k}={v}" for k, v in TILE_DEFINES.items()),  # as CudaMatcher passes them to nvcc
        f"-I{SIMT_DIR}",
        f"-I{SIMT_DIR / 'include'}",
        f"-I{KERNEL_DIR}",
        str(SIMT_DIR / "simt_kernels.cpp"),
        "-o",
        "",
    ]
    digest = hashlib.sha256(" ".join(cmd[1:-2]).encode())  # flags, not the temporary name
    for p in SOURCES:
        digest.update(p.name.encode() + b"\0" + p.read_bytes())
    out = cache / f"libsimt-{digest.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    cmd[-1] = str(out.with_suffix(f".{os.getpid()}.tmp"))
    tmp = Path(cmd[-1])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"emulator build failed:\n{res.stderr[-4000:]}")
    tmp.replace(out)
    return out


def session_library(request: Any) -> Path:
    """The emulator for a pytest session: skip without g++; cached in .pytest_cache if enabled."""
    import pytest

    if compiler() is None:
        pytest.skip("no C++ compiler (g++) to build the SIMT emulator")
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        where = Path(cache.mkdir("simt"))
    else:  # -p no:cacheprovider
        where = request.getfixturevalue("tmp_path_factory").mktemp("simt")
    return build(where)


class DeviceMemory:
    """Device memory as guarded host memory; needs no emulator library (the TensorRT fake uses
    it alone, the emulator's Device adds kernel launches)."""

    def __init__(self) -> None:
        self.blocks: dict[int, tuple[np.ndarray, int]] = {}  # ptr -> (backing, nbytes)
        self.allocs = 0

    # ------------------------------------------------------------------ memory
    def alloc(self, nbytes: int) -> int:
        nbytes = max(int(nbytes), 1)
        backing = np.empty(nbytes + 2 * 256 + GUARD, dtype=np.uint8)
        base = backing.ctypes.data
        off = (-base) % 256
        ptr = base + off
        backing[off : off + nbytes] = 0xCD  # fresh device memory is garbage, not zeros
        backing[off + nbytes : off + nbytes + GUARD] = GUARD_BYTE
        self.blocks[ptr] = (backing, nbytes)
        self.allocs += 1
        return ptr

    def free(self, ptr: int) -> None:
        self.blocks.pop(int(ptr), None)

    def view(self, ptr: int, dtype: np.dtype | type, count: int) -> np.ndarray:
        """A NumPy view of device memory, bounds-checked against its allocation."""
        dt = np.dtype(dtype)
        ptr = int(ptr)
        for base, (backing, nbytes) in self.blocks.items():
            if base <= ptr < base + nbytes:
                off = ptr - backing.ctypes.data
                end = off + dt.itemsize * count
                if ptr + dt.itemsize * count > base + nbytes:
                    raise SimtError(f"device access out of bounds at {ptr:#x}")
                return backing[off:end].view(dt)
        raise SimtError(f"invalid device pointer {ptr:#x}")

    def upload(self, arr: np.ndarray) -> int:
        a = np.ascontiguousarray(arr)
        ptr = self.alloc(a.nbytes)
        self.view(ptr, np.uint8, a.nbytes)[:] = a.reshape(-1).view(np.uint8)
        return ptr

    def check_guards(self) -> None:
        for ptr, (backing, nbytes) in self.blocks.items():
            off = ptr - backing.ctypes.data
            if not np.all(backing[off + nbytes : off + nbytes + GUARD] == GUARD_BYTE):
                raise SimtError(f"a kernel wrote past the end of the {nbytes}-byte buffer {ptr:#x}")

    def owns(self, ptr: int) -> bool:
        return any(b <= int(ptr) < b + n for b, (_, n) in self.blocks.items())


class Device(DeviceMemory):
    """One emulated device: memory with guard bands, and launches by kernel name."""

    def __init__(self, lib_path: Path, seed: int = 0, eager: bool = False) -> None:
        super().__init__()
        self.lib = ctypes.CDLL(str(lib_path))
        self.lib.simt_launch.restype = ctypes.c_int
        self.lib.simt_launch.argtypes = [
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_ulonglong,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        self.lib.simt_counter.restype = ctypes.c_ulonglong
        self.lib.simt_counter.argtypes = [ctypes.c_int]
        self.seed = seed
        self.eager = eager
        self.launches = 0

    def counters(self) -> dict[str, int]:
        """Totals since the library was loaded: warp collectives, ldmatrix wavefronts/matrices."""
        names = ("collectives", "ldmatrix_wavefronts", "ldmatrix_matrices")
        return {n: int(self.lib.simt_counter(i)) for i, n in enumerate(names)}

    # ------------------------------------------------------------------ launches
    def launch(
        self,
        name: str,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        fmt: str,
        *args: int | float,
        shared: int = 0,
    ) -> None:
        """Run a kernel; ``fmt`` types the arguments as pycuda's prepare does (P pointer, i int)."""
        if len(fmt) != len(args):
            raise SimtError(f"{name}: {len(args)} arguments for signature {fmt!r}")
        holders: list[ctypes._SimpleCData] = []
        for f, a in zip(fmt, args, strict=True):
            if f == "P":
                if not isinstance(a, int) or not self.owns(a):
                    raise SimtError(f"{name}: argument {a!r} is not a device pointer")
                holders.append(ctypes.c_void_p(a))
            elif f == "i":
                holders.append(ctypes.c_int(int(a)))
            else:
                raise SimtError(f"{name}: argument type {f!r} not emulated")
        argv = (ctypes.c_void_p * len(holders))(
            *[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders]
        )
        g = (ctypes.c_uint * 3)(*[*grid, 1, 1][:3])
        b = (ctypes.c_uint * 3)(*[*block, 1, 1][:3])
        err = ctypes.create_string_buffer(512)
        rc = self.lib.simt_launch(
            name.encode(), g, b, shared, argv, self.seed + self.launches, int(self.eager), err, 512
        )
        self.launches += 1
        if rc != 0:
            raise SimtError(f"{name}: {err.value.decode()}")
        self.check_guards()
