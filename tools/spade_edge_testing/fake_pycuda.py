"""The one fake ``pycuda`` (driver + compiler): spade-edge's GPU host code runs with no GPU.

Only the driver surface spade-edge uses is provided (CudaMatcher, the TensorRT runner and engine
builder, ``runtime/gpu.py``), with one state object, :class:`FakeGpu`, that tests inspect and
change (allocations, frees, retained/detached primary contexts, the context stack, name, compute
capability, device count). Device memory is guarded host memory (``simt_device.DeviceMemory``):
an access outside an allocation is an error. Allocations, frees, copies, compiles, launches and
stream synchronisation refuse to run without a current context, which checks the primary-context
discipline of the code under test. Two back ends:

* :func:`install_emulator`: memory and kernel launches of the SIMT emulator, so
  ``pycuda.compiler.SourceModule`` + ``prepared_async_call`` run the shipped .cu sources with
  pycuda's argument conventions; shared memory above 48 KiB must be opted into per function, as
  on a GPU; attribute tables describe the three targets (:data:`TARGETS`), so block-row planning
  sees each one's shared-memory limits.
* plain guarded memory (the TensorRT fake, ``fake_tensorrt.install``): no kernels.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge_testing import simt_device
from spade_edge_testing.simt_device import DeviceMemory, SimtError

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


class Error(Exception):
    """pycuda.driver.Error's stand-in."""


class LaunchError(Error):
    """pycuda.driver.LaunchError's stand-in: a launch pycuda would have refused."""


class ContextError(RuntimeError):
    """A driver call without a current context: a bug in the caller's context discipline
    (not a pycuda.driver.Error, so no ``except cuda.Error`` in the code under test hides it)."""


@dataclass
class FakeGpu:
    """One fake GPU: its description, memory and driver bookkeeping (inspected by tests).

    ``target`` names an entry of :data:`TARGETS` for the attribute tables and the architecture
    ``SourceModule`` accepts; kernels launch only when ``mem`` is an emulator ``Device``.
    """

    mem: DeviceMemory = field(default_factory=DeviceMemory)
    gpu_name: str = "Fake GPU"
    cc: tuple[int, int] = (8, 7)
    target: str = "sm_87"
    device_count: int = 1
    ctx_stack: list[Any] = field(default_factory=list)
    allocs: int = 0
    frees: int = 0
    retained: int = 0
    detached: int = 0

    @classmethod
    def for_target(cls, mem: DeviceMemory, target: str) -> FakeGpu:
        """A GPU of one of :data:`TARGETS` (compute capability and name from the target)."""
        return cls(mem, f"SIMT emulator ({target})", TARGETS[target][0], target)

    @property
    def memory(self) -> dict[int, tuple[np.ndarray, int]]:
        """Live allocations: device pointer -> (backing, size)."""
        return self.mem.blocks

    @property
    def used_bytes(self) -> int:
        return sum(n for _, n in self.mem.blocks.values())

    def need_context(self, what: str) -> None:
        if not self.ctx_stack:
            raise ContextError(f"fake CUDA: {what} without a current context")


def make_pycuda(gpu: FakeGpu) -> types.ModuleType:
    """A ``pycuda`` package with ``driver`` (and ``compiler`` when ``gpu.mem`` can launch)."""
    cc_attrs = TARGETS.get(gpu.target, ((0, 0), {}))[1]

    def _view(ptr: Any, nbytes: int, what: str) -> np.ndarray:
        try:
            return gpu.mem.view(int(ptr), np.uint8, nbytes)
        except SimtError as e:
            raise Error(f"fake CUDA: {what}: {e}") from None

    class DeviceAllocation:
        def __init__(self, nbytes: int) -> None:
            gpu.need_context("mem_alloc")
            self.nbytes = int(nbytes)
            self.ptr = gpu.mem.alloc(self.nbytes)
            gpu.allocs += 1

        def __int__(self) -> int:
            return self.ptr

        def free(self) -> None:
            gpu.need_context("free")
            if self.ptr in gpu.mem.blocks:
                gpu.mem.free(self.ptr)
                gpu.frees += 1

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        return DeviceAllocation(int(nbytes))

    def mem_get_info() -> tuple[int, int]:
        return TOTAL_MEMORY - gpu.used_bytes, TOTAL_MEMORY

    def memcpy_htod(dest: Any, src: np.ndarray, stream: Any = None) -> None:
        gpu.need_context("memcpy_htod")
        b = np.ascontiguousarray(src).reshape(-1).view(np.uint8)
        _view(dest, b.size, "host-to-device copy")[:] = b

    def memcpy_dtoh(dest: np.ndarray, src: Any, stream: Any = None) -> None:
        gpu.need_context("memcpy_dtoh")
        if not dest.flags.c_contiguous:
            raise Error("fake CUDA: destination must be contiguous")
        b = dest.reshape(-1).view(np.uint8)
        b[:] = _view(src, b.size, "device-to-host copy")

    def pagelocked_empty(shape: Any, dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype)

    class Context:
        def push(self) -> None:
            gpu.ctx_stack.append(self)

        def detach(self) -> None:
            gpu.detached += 1

        @staticmethod
        def pop() -> None:
            gpu.ctx_stack.pop()

        @staticmethod
        def get_current() -> Any:
            return gpu.ctx_stack[-1] if gpu.ctx_stack else None

        @staticmethod
        def get_device() -> Any:
            if not gpu.ctx_stack:
                raise LaunchError("no current context")
            return Device(0)

    class Device:
        def __init__(self, index: int) -> None:
            if not 0 <= index < gpu.device_count:
                raise Error(f"fake CUDA: no device {index}")
            self.index = index

        @staticmethod
        def count() -> int:
            return gpu.device_count

        def name(self) -> str:
            return gpu.gpu_name

        def compute_capability(self) -> tuple[int, int]:
            return gpu.cc

        def get_attribute(self, attr: str) -> int:
            return cc_attrs[attr]

        def retain_primary_context(self) -> Context:
            gpu.retained += 1
            return Context()

    class Stream:
        handle = 0x5EED

        def synchronize(self) -> None:
            gpu.need_context("Stream.synchronize")

    class Event:
        def record(self, stream: Any = None) -> None:
            pass

        def time_since(self, other: Any) -> float:
            return 0.0

    class Names:
        def __getattr__(self, name: str) -> str:
            return name

    drv = types.ModuleType("pycuda.driver")
    drv.__dict__.update(
        init=lambda: None,
        Error=Error,
        LaunchError=LaunchError,
        MemoryError=MemoryError,
        Device=Device,
        Context=Context,
        device_attribute=Names(),
        function_attribute=Names(),
        mem_alloc=mem_alloc,
        mem_get_info=mem_get_info,
        memcpy_htod=memcpy_htod,
        memcpy_htod_async=memcpy_htod,
        memcpy_dtoh=memcpy_dtoh,
        memcpy_dtoh_async=memcpy_dtoh,
        pagelocked_empty=pagelocked_empty,
        Stream=Stream,
        Event=Event,
    )
    pkg = types.ModuleType("pycuda")
    pkg.__path__ = []  # a package: ``import pycuda.driver`` finds the submodule in sys.modules
    pkg.driver = drv  # type: ignore[attr-defined]
    pkg.gpu = gpu  # type: ignore[attr-defined]
    if isinstance(gpu.mem, simt_device.Device):
        pkg.compiler = _compiler(gpu, gpu.mem, cc_attrs)  # type: ignore[attr-defined]
    return pkg


def _compiler(gpu: FakeGpu, dev: simt_device.Device, attrs: dict[str, int]) -> types.ModuleType:
    """``pycuda.compiler`` whose modules launch the emulator's build of the shipped kernels."""

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
            gpu.need_context(f"{self.name} launch")
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
            gpu.need_context("SourceModule")
            if arch != gpu.target:
                raise LaunchError(f"module built for {arch}, device is {gpu.target}")
            self.source = source

        def get_function(self, name: str) -> Function:
            # the emulator library holds every kernel; this module must define the entry
            if f"void {name}(" not in self.source and not (
                name.startswith("knn_min_bm") and "KNN_INSTANCE(" in self.source
            ):
                raise LaunchError(f"no kernel {name} in this module")
            return Function(name)

    compiler = types.ModuleType("pycuda.compiler")
    compiler.SourceModule = SourceModule  # type: ignore[attr-defined]
    return compiler


def install(
    gpu: FakeGpu, setitem: Callable[[dict, str, Any], None] | None = None
) -> types.ModuleType:
    """Make ``import pycuda`` (``.driver``, ``.compiler``) give the fake bound to ``gpu``.

    ``setitem`` is how sys.modules is written: pytest's monkeypatch.setitem in tests (undone
    after each), plain assignment in scripts."""
    pkg = make_pycuda(gpu)
    put = setitem or (lambda d, k, v: d.__setitem__(k, v))
    put(sys.modules, "pycuda", pkg)
    for sub in ("driver", "compiler"):
        if hasattr(pkg, sub):
            put(sys.modules, f"pycuda.{sub}", getattr(pkg, sub))
    return pkg


def install_emulator(
    lib: Path | None = None,
    target: str = "sm_90",
    setitem: Callable[[dict, str, Any], None] | None = None,
) -> types.ModuleType:
    """``import pycuda`` gives the SIMT emulator's device of ``target`` (``lib`` defaults to a
    build in the checkout's .pytest_cache). The emulated pycuda's ``device`` attribute is the
    emulator (memory, launch counters)."""
    dev = simt_device.Device(lib or simt_device.build(simt_device.DEFAULT_CACHE))
    pkg = install(FakeGpu.for_target(dev, target), setitem)
    pkg.device = dev  # type: ignore[attr-defined]
    return pkg
