"""The one pycuda importer and the CUDA device/context helper, shared by every GPU backend.

The TensorRT runner, the engine builder and the CUDA matcher all work in a device's *primary*
context (the one the CUDA runtime inside TensorRT uses), so device pointers are valid for
TensorRT, pycuda and any other primary-context user. pycuda is imported here only, on first use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from spade_edge.runtime.engine_file import normalize_compute_capability
from spade_edge.runtime.errors import BackendUnavailableError

PYCUDA_HINT = (
    "install it with pip install 'spade-edge[trt]' (needs the CUDA toolkit to build on Jetson)"
)


def import_pycuda(what: str = "this backend") -> Any:  # pycuda ships no type information
    """``pycuda.driver`` or a BackendUnavailableError naming ``what`` needs it."""
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        raise BackendUnavailableError(
            f"{what} needs pycuda, which cannot be imported here ({e}); {PYCUDA_HINT}"
        ) from None
    except Exception as e:  # pycuda present but libcuda missing/broken (OSError and others)
        raise BackendUnavailableError(f"{what}: pycuda cannot load: {e}; {PYCUDA_HINT}") from None
    return cuda


def import_source_module(what: str = "this backend") -> Any:
    """``pycuda.compiler.SourceModule`` (runtime kernel compilation) or BackendUnavailableError."""
    try:
        from pycuda.compiler import SourceModule
    except ImportError as e:
        raise BackendUnavailableError(f"{what}: pycuda.compiler: {e}; {PYCUDA_HINT}") from None
    return SourceModule


@dataclass
class CudaDevice:
    """One GPU, its name, compute capability and the context backends run in.

    ``owned``: the primary context was retained by :meth:`open` (and is detached by
    :meth:`release`); a context that was already current (:meth:`current`) is only borrowed.
    """

    cuda: ModuleType
    index: int
    name: str
    compute_capability: str
    context: Any
    owned: bool = True

    @classmethod
    def open(cls, cuda: ModuleType, index: int = 0) -> CudaDevice:
        """Retain device ``index``'s primary context (BackendUnavailableError if unusable)."""
        try:
            cuda.init()
            count = cuda.Device.count()
        except cuda.Error as e:
            raise BackendUnavailableError(f"no usable CUDA driver/GPU here: {e}") from None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
            raise BackendUnavailableError(
                f"CUDA device {index!r} does not exist here ({count} device(s) visible)"
            )
        dev = cuda.Device(index)
        cc = normalize_compute_capability(tuple(int(x) for x in dev.compute_capability()))
        ctx = dev.retain_primary_context()
        return cls(cuda, index, str(dev.name()), cc, ctx)

    @classmethod
    def current_or_open(cls, cuda: ModuleType, index: int = 0) -> CudaDevice:
        """The caller's current context if there is one (its pointers stay valid), else
        device ``index``'s primary context."""
        try:
            cuda.init()
            ctx = cuda.Context.get_current()
        except cuda.Error as e:
            raise BackendUnavailableError(f"no usable CUDA driver/GPU here: {e}") from None
        if ctx is None:
            return cls.open(cuda, index)
        dev = cuda.Context.get_device()
        cc = normalize_compute_capability(tuple(int(x) for x in dev.compute_capability()))
        return cls(cuda, index, str(dev.name()), cc, ctx, owned=False)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make the context current on this thread for the ``with`` body."""
        self.context.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def release(self) -> None:
        """Drop the retained primary context (a borrowed context is left alone)."""
        if self.owned:
            with contextlib.suppress(Exception):
                self.context.detach()


__all__ = ["PYCUDA_HINT", "CudaDevice", "import_pycuda", "import_source_module"]
