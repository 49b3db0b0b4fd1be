"""A pycuda stand-in over the SIMT emulator: CudaMatcher's own code, its real kernels, no GPU.

Only the driver surface CudaMatcher uses is provided. Kernel launches run the shipped .cu
sources (tests/simt) with pycuda's argument conventions; device memory is guarded host memory;
shared memory above 48 KiB must be opted into per function, as on a GPU. Attribute tables
describe the three targets, so block-row planning sees each one's shared-memory limits.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import simt_device
from simt_device import Device

#: (compute capability, attributes) of the targets: Jetson AGX Orin, L4 (Ada), H200 (Hopper)
TARGETS: dict[str, tuple[tuple[int, int], dict[str, int]]] = {
    "sm_87": (
        (8, 7),
        {
            "MULTIPROCESSOR_COUNT": 16,
            "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN": 166912,
            "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR": 167936,
            "MAX_REGISTERS_PER_MULTIPROCESSOR": 65536,
        },
    ),
    "sm_89": (
        (8, 9),
        {
            "MULTIPROCESSOR_COUNT": 58,
            "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN": 101376,
            "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR": 102400,
            "MAX_REGISTERS_PER_MULTIPROCESSOR": 65536,
        },
    ),
    "sm_90": (
        (9, 0),
        {
            "MULTIPROCESSOR_COUNT": 132,
            "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN": 232448,
            "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR": 233472,
            "MAX_REGISTERS_PER_MULTIPROCESSOR": 65536,
        },
    ),
}
TOTAL_MEMORY = 16 << 30
#: registers per thread reported for every kernel (knn_min_bm128 uses 127 on sm_90, per ptxas)
REGISTERS = 128
DEFAULT_SMEM_LIMIT = 48 * 1024


class LaunchError(RuntimeError):
    """pycuda.driver.LaunchError's stand-in: a launch pycuda would have refused."""


def make_pycuda(dev: Device, target: str = "sm_90") -> types.SimpleNamespace:
    """A module-like ``pycuda`` with ``driver`` and ``compiler`` bound to one emulated device."""
    cc, attrs = TARGETS[target]
    used = {"bytes": 0}

    class DeviceAllocation:
        def __init__(self, nbytes: int) -> None:
            self.nbytes = int(nbytes)
            self.ptr = dev.alloc(self.nbytes)
            used["bytes"] += self.nbytes

        def __int__(self) -> int:
            return self.ptr

        def free(self) -> None:
            if self.ptr in dev.blocks:
                dev.free(self.ptr)
                used["bytes"] -= self.nbytes

    def memcpy_htod(dst: Any, src: np.ndarray, stream: Any = None) -> None:
        b = np.ascontiguousarray(src).reshape(-1).view(np.uint8)
        dev.view(int(dst), np.uint8, b.size)[:] = b

    def memcpy_dtoh(dst: np.ndarray, src: Any, stream: Any = None) -> None:
        b = dst.reshape(-1).view(np.uint8)
        b[:] = dev.view(int(src), np.uint8, b.size)

    class Function:
        def __init__(self, name: str) -> None:
            self.name = name
            self.fmt: str | None = None
            self.smem_limit = DEFAULT_SMEM_LIMIT

        def prepare(self, fmt: str) -> None:
            self.fmt = fmt

        def set_attribute(self, attr: str, value: int) -> None:
            if attr != "MAX_DYNAMIC_SHARED_SIZE_BYTES":
                raise LaunchError(f"attribute {attr} not emulated")
            if value > attrs["MAX_SHARED_MEMORY_PER_BLOCK_OPTIN"]:
                raise LaunchError(f"{self.name}: {value} B of shared memory exceeds the opt-in")
            self.smem_limit = int(value)

        def get_attribute(self, attr: str) -> int:
            if attr != "NUM_REGS":
                raise LaunchError(f"attribute {attr} not emulated")
            return REGISTERS

        def prepared_async_call(
            self, grid: tuple, block: tuple, stream: Any, *args: Any, shared_size: int = 0
        ) -> None:
            if self.fmt is None:
                raise LaunchError(f"{self.name}: prepared_async_call before prepare")
            if shared_size > self.smem_limit:
                raise LaunchError(
                    f"{self.name}: {shared_size} B of dynamic shared memory, limit "
                    f"{self.smem_limit} (set MAX_DYNAMIC_SHARED_SIZE_BYTES)"
                )
            if not all(isinstance(a, int) for a in args):
                raise LaunchError(f"{self.name}: prepared arguments must be ints: {args!r}")
            dev.launch(self.name, tuple(grid), tuple(block), self.fmt, *args, shared=shared_size)

    class SourceModule:
        def __init__(
            self,
            source: str,
            options: Any = None,
            no_extern_c: bool = False,
            arch: str | None = None,
            cache_dir: str | None = None,
        ) -> None:
            if arch != target:
                raise LaunchError(f"module built for {arch}, device is {target}")
            self.source = source

        def get_function(self, name: str) -> Function:
            # the emulator library holds every kernel; this module must define the entry
            if f"void {name}(" not in self.source and not (
                name.startswith("knn_min_bm") and "KNN_INSTANCE(" in self.source
            ):
                raise LaunchError(f"no kernel {name} in this module")
            return Function(name)

    class Context:
        stack: list[Any] = []  # noqa: RUF012

        def push(self) -> None:
            Context.stack.append(self)

        @staticmethod
        def pop() -> None:
            Context.stack.pop()

        @staticmethod
        def get_current() -> Any:
            return Context.stack[-1] if Context.stack else None

        @staticmethod
        def get_device() -> Any:
            if not Context.stack:
                raise LaunchError("no current context")
            return DeviceObj(0)

    class DeviceObj:
        def __init__(self, i: int) -> None:
            if i != 0:
                raise LaunchError(f"no device {i}")

        count = staticmethod(lambda: 1)
        name = staticmethod(lambda: f"SIMT emulator ({target})")
        compute_capability = staticmethod(lambda: cc)
        get_attribute = staticmethod(lambda a: attrs[a])

        def retain_primary_context(self) -> Any:
            return Context()

    class Names:
        def __getattr__(self, name: str) -> str:
            return name

    class Event:
        def record(self, stream: Any = None) -> None:
            pass

        def time_since(self, other: Any) -> float:
            return 0.0

    drv = types.SimpleNamespace(
        init=lambda: None,
        Error=LaunchError,
        LaunchError=LaunchError,
        MemoryError=MemoryError,
        Device=DeviceObj,
        Context=Context,
        device_attribute=Names(),
        function_attribute=Names(),
        mem_alloc=DeviceAllocation,
        mem_get_info=lambda: (TOTAL_MEMORY - used["bytes"], TOTAL_MEMORY),
        memcpy_htod=memcpy_htod,
        memcpy_htod_async=memcpy_htod,
        memcpy_dtoh=memcpy_dtoh,
        memcpy_dtoh_async=memcpy_dtoh,
        pagelocked_empty=lambda n, dtype: np.zeros(n, dtype),
        Stream=lambda: types.SimpleNamespace(synchronize=lambda: None),
        Event=Event,
    )
    compiler = types.SimpleNamespace(SourceModule=SourceModule)
    return types.SimpleNamespace(driver=drv, compiler=compiler, device=dev)


def install(
    lib: Path | None = None,
    target: str = "sm_90",
    setitem: Callable[[dict, str, Any], None] | None = None,
) -> types.SimpleNamespace:
    """Make ``import pycuda`` give the emulated device (``lib`` defaults to a build in
    .pytest_cache). ``setitem`` is how sys.modules is written: pytest's monkeypatch.setitem in
    tests (undone after each), plain assignment in scripts."""
    pkg = make_pycuda(Device(lib or simt_device.build(simt_device.DEFAULT_CACHE)), target)
    put = setitem or (lambda d, k, v: d.__setitem__(k, v))
    modules = {"pycuda": pkg, "pycuda.driver": pkg.driver, "pycuda.compiler": pkg.compiler}
    for name, mod in modules.items():
        put(sys.modules, name, mod)
    return pkg
