"""The runner interface: one batch of preprocessed images in, the SPADE pyramid out.

Modelled on Polygraphy's runners: construct (load once), ``infer`` many times, ``close``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from spade_edge.runtime.contract import Contract
from spade_edge.runtime.errors import FormatError, InputError


def check_batch(batch: Any, contract: Contract) -> np.ndarray:
    """The batch as contiguous float32 ``[B, 3, S, S]``; InputError naming its shape if not."""
    s = contract.image_size
    if not isinstance(batch, np.ndarray) or batch.ndim != 4 or batch.shape[1:] != (3, s, s):
        shape = getattr(batch, "shape", None)
        raise InputError(f"batch shape {shape} does not match the contract [B,3,{s},{s}]")
    return np.ascontiguousarray(batch, dtype=np.float32)


def check_outputs(where: object, names: Iterable[str], contract: Contract) -> None:
    """FormatError if the model (``where``) lacks an output its contract names."""
    have = set(names)
    missing = [n for n in contract.output_names if n not in have]
    if missing:
        raise FormatError(f"{where}: model lacks outputs named in its contract: {missing}")


@dataclass
class Features:
    """Pyramid features of a batch of B images.

    Host form: ``levels[i]`` is float32 ``[B, H, W, C]`` and ``pooled`` float32 ``[B, Cg]``.
    Device form (TensorRT runner): ``device`` is True and ``levels``/``pooled`` hold objects
    exposing an integer device pointer via ``int(obj)`` (e.g. pycuda DeviceAllocation), with
    ``dtypes`` saying float32 or float16; ``to_host()`` copies them back for the NumPy matcher.
    """

    levels: list[Any]
    pooled: Any
    batch: int
    device: bool = False
    dtypes: tuple[str, ...] = ()
    _to_host: Callable[[], Features] | None = None

    def to_host(self) -> Features:
        """Host copy (no-op for host features)."""
        if not self.device or self._to_host is None:
            return self
        return self._to_host()

    def image(self, i: int) -> Features:
        """Features of image ``i`` as a batch of one (host form only)."""
        f = self.to_host()
        return Features(
            levels=[lv[i : i + 1] for lv in f.levels], pooled=f.pooled[i : i + 1], batch=1
        )


@runtime_checkable
class Runner(Protocol):
    """Inference backend. ``contract``/``fingerprint`` identify the model it runs."""

    name: str
    contract: Contract
    fingerprint: str
    max_batch: int | None

    @property
    def metadata(self) -> Mapping[str, str]:
        """The model's ONNX metadata_props (lineage included): compat decisions read it."""
        ...

    #: may one instance run ``infer`` from several threads at once (else callers serialise)
    thread_safe: bool

    def infer(self, batch: np.ndarray) -> Features:
        """Run a float32 ``[B, 3, S, S]`` normalised batch; B <= max_batch when set."""
        ...

    def close(self) -> None:
        """Release sessions / device buffers; idempotent; ``infer`` afterwards raises."""
        ...

    def __enter__(self) -> Any:
        """``with runner:`` closes it on exit (runtime.registry.Backend)."""
        ...

    def __exit__(self, *exc: object) -> None: ...
