"""The spade-edge TensorRT engine file: a serialized plan plus everything needed to trust it.

Why not a bare ``.plan``: a TensorRT plan only runs with the exact TensorRT version and GPU
architecture it was built for, and says nothing about the preprocessing or the model it came
from. Loading the wrong one fails deep inside TensorRT (or worse, silently scores with the
wrong preprocessing). So the plan travels in the generic container (runtime/container.py,
magic ``b"SPADEENG"``) with a JSON manifest holding the model fingerprint, the preprocessing
contract, the TensorRT version, the GPU name and compute capability, the precision, the I/O
tensors and the batch range. The runtime checks the manifest **before** handing the plan to
TensorRT and refuses mismatches with a :class:`CompatibilityError` naming both sides.

This module never imports tensorrt: ``spade-inspect`` and the refusals work everywhere.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime import __version__
from spade_edge.runtime.container import (
    ENGINE_MAGIC,
    Container,
    read_container,
    write_container,
)
from spade_edge.runtime.contract import Contract
from spade_edge.runtime.errors import CompatibilityError, FormatError
from spade_edge.runtime.fileio import is_sha256_hex, utc_timestamp

ENGINE_FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (ENGINE_FORMAT_VERSION,)
ENGINE_KIND = "spade-edge TensorRT engine"
PLAN_BLOB = "plan"
MAX_BATCH_CAP = 4096
PRECISIONS = ("fp32", "fp16", "int8")
#: I/O dtypes an engine may expose (TensorRT DataType names mapped to NumPy names).
IO_DTYPES = ("float32", "float16", "int8", "int32", "int64", "bool", "uint8")

_TRT_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:[.+-]?(?:post|dev|rc)\w*)?")
_CC = re.compile(r"(\d{1,2})\.(\d{1,2})")
_REQUIRED = {
    "kind": str,
    "tool_version": str,
    "model_fingerprint": str,
    "contract": dict,
    "precision": str,
    "tensorrt_version": str,
    "gpu_name": str,
    "compute_capability": str,
    "max_batch": int,
    "opt_batch": int,
    "inputs": list,
    "outputs": list,
    "build": dict,
    "source": dict,
    "onnx_metadata": dict,
    "created": str,
}


@dataclass(frozen=True)
class TensorSpec:
    """One engine I/O tensor: name, NumPy dtype name and shape (-1 = the dynamic batch)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @property
    def per_image_shape(self) -> tuple[int, ...]:
        """Shape without the batch axis."""
        return self.shape[1:]


@dataclass
class EngineFile:
    """A validated engine file. ``plan()`` is a read-only memory-mapped uint8 view."""

    path: Path
    version: int
    manifest: dict[str, Any]
    contract: Contract
    fingerprint: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    max_batch: int
    opt_batch: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    plan_nbytes: int
    _container: Container | None = field(default=None, repr=False)

    @property
    def metadata(self) -> dict[str, str]:
        """The source ONNX's metadata_props (contract, fingerprint, lineage of derived models)."""
        return dict(self.manifest["onnx_metadata"])

    @property
    def parent_fingerprint(self) -> str | None:
        """The fp32 model's fingerprint for fp16/int8 engines (from the contract)."""
        return self.contract.parent_fingerprint

    def plan(self) -> np.ndarray:
        """The serialized TensorRT plan (uint8, memory-mapped; valid until ``close``)."""
        if self._container is None:
            raise FormatError(f"{self.path}: engine file is closed")
        return self._container.blob(PLAN_BLOB)

    def verify(self) -> None:
        """Check the plan's SHA-256 against the manifest (reads the whole plan)."""
        if self._container is None:
            raise FormatError(f"{self.path}: engine file is closed")
        self._container.verify()

    def check_runtime(self, tensorrt_version: str, compute_capability: str, gpu_name: str) -> None:
        """Refuse to run here unless TensorRT version and compute capability match the build."""
        check_tensorrt_version(self.tensorrt_version, tensorrt_version, self.path)
        if normalize_compute_capability(compute_capability) != self.compute_capability:
            raise CompatibilityError(
                f"{self.path}: engine was built for compute capability {self.compute_capability} "
                f"({self.gpu_name}) but this GPU is {gpu_name} with compute capability "
                f"{compute_capability}; rebuild the engine on this machine "
                f"(spade-export --from-onnx MODEL.onnx --engine {self.path.name})"
            )

    def close(self) -> None:
        c, self._container = self._container, None
        if c is not None:
            c.close()

    def __enter__(self) -> EngineFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------ versions


def tensorrt_version_key(version: str) -> tuple[int, ...]:
    """Numeric components of a TensorRT version ('10.3.0.30', '10.13.3.9.post1' -> ints)."""
    m = _TRT_VERSION.fullmatch(version.strip()) if isinstance(version, str) else None
    if m is None:
        raise FormatError(f"TensorRT version {version!r} is not of the form MAJOR.MINOR[.PATCH]")
    return tuple(int(g) for g in m.groups() if g is not None)


def check_tensorrt_version(built: str, runtime: str, path: str | Path) -> None:
    """A plan runs only on the TensorRT release it was built with (TensorRT's own rule).

    Compared on the numeric components both strings carry (at least MAJOR.MINOR.PATCH when
    present): pip's ``10.3.0`` equals JetPack's ``10.3.0.30``, ``10.3.0.26`` does not equal
    ``10.3.0.30``, and a packaging suffix such as ``.post1`` is ignored.
    """
    a, b = tensorrt_version_key(built), tensorrt_version_key(runtime)
    n = min(len(a), len(b))
    if a[:n] != b[:n] or (n < 3 and len(a) != len(b)):
        raise CompatibilityError(
            f"{path}: engine was built with TensorRT {built} but this machine has TensorRT "
            f"{runtime}; rebuild the engine here "
            f"(spade-export --from-onnx MODEL.onnx --engine {Path(path).name})"
        )


def normalize_compute_capability(cc: str | tuple[int, int] | Sequence[int]) -> str:
    """Canonical 'MAJOR.MINOR' from (8, 7) or '8.7'; FormatError for anything else."""
    if isinstance(cc, str):
        m = _CC.fullmatch(cc.strip())
        if m is None:
            raise FormatError(f"compute capability {cc!r} is not of the form MAJOR.MINOR")
        return f"{int(m.group(1))}.{int(m.group(2))}"
    parts = tuple(cc)
    if len(parts) != 2 or not all(isinstance(x, int) and 0 <= x < 100 for x in parts):
        raise FormatError(f"compute capability {cc!r} is not (major, minor)")
    return f"{parts[0]}.{parts[1]}"


# ------------------------------------------------------------------------------ validation


def _tensor_specs(value: Any, what: str, src: str) -> tuple[TensorSpec, ...]:
    if not isinstance(value, list) or not value or len(value) > 64:
        raise FormatError(f"{src}: engine manifest field {what!r} must be a non-empty list")
    specs = []
    for i, t in enumerate(value):
        if not isinstance(t, dict) or set(t) != {"name", "dtype", "shape"}:
            raise FormatError(f"{src}: engine manifest {what}[{i}] must have name, dtype, shape")
        name, dtype, shape = t["name"], t["dtype"], t["shape"]
        if not isinstance(name, str) or not 0 < len(name) <= 255:
            raise FormatError(f"{src}: engine manifest {what}[{i}].name is invalid")
        if dtype not in IO_DTYPES:
            raise FormatError(f"{src}: engine manifest {what}[{i}].dtype {dtype!r} is unknown")
        if (
            not isinstance(shape, list)
            or not 1 <= len(shape) <= 8
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or shape[0] != -1
            or not all(0 < d <= 1 << 20 for d in shape[1:])
        ):
            raise FormatError(
                f"{src}: engine manifest {what}[{i}].shape {shape!r:.60} must be "
                "[-1, positive dims...] (dynamic batch first)"
            )
        specs.append(TensorSpec(name, dtype, tuple(shape)))
    if len({s.name for s in specs}) != len(specs):
        raise FormatError(f"{src}: engine manifest field {what!r} repeats a tensor name")
    return tuple(specs)


def _validate(manifest: Any, src: str) -> dict[str, Any]:
    """Type-check every manifest field and its consistency with the contract; parsed values."""
    if not isinstance(manifest, dict):
        raise FormatError(f"{src}: engine manifest is not a JSON object")
    for key, typ in _REQUIRED.items():
        if key not in manifest:
            raise FormatError(f"{src}: engine manifest lacks field {key!r}")
        v = manifest[key]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise FormatError(
                f"{src}: engine manifest field {key!r} must be {typ.__name__}, "
                f"got {type(v).__name__}"
            )
    if manifest["kind"] != ENGINE_KIND:
        raise FormatError(f"{src}: engine manifest field 'kind' is {manifest['kind']!r:.60}")
    fp = manifest["model_fingerprint"]
    if not is_sha256_hex(fp):
        raise FormatError(f"{src}: engine manifest field 'model_fingerprint' is malformed")
    contract = Contract.from_dict(manifest["contract"], f"{src} (engine contract)")
    precision = manifest["precision"]
    if precision not in PRECISIONS:
        raise FormatError(f"{src}: engine manifest field 'precision' {precision!r:.20} unknown")
    if precision != contract.precision:
        raise FormatError(
            f"{src}: engine manifest precision {precision!r} differs from its contract's "
            f"{contract.precision!r}"
        )
    try:
        tensorrt_version_key(manifest["tensorrt_version"])
        cc = normalize_compute_capability(manifest["compute_capability"])
    except FormatError as e:
        raise FormatError(f"{src}: engine manifest: {e}") from None
    if cc != manifest["compute_capability"]:
        raise FormatError(f"{src}: engine manifest field 'compute_capability' is not canonical")
    meta = manifest["onnx_metadata"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(f"{src}: engine manifest field 'onnx_metadata' must map str to str")
    max_batch, opt_batch = manifest["max_batch"], manifest["opt_batch"]
    if not 1 <= max_batch <= MAX_BATCH_CAP:
        raise FormatError(f"{src}: engine manifest field 'max_batch' {max_batch} out of range")
    if not 1 <= opt_batch <= max_batch:
        raise FormatError(f"{src}: engine manifest field 'opt_batch' {opt_batch} not in 1..max")
    inputs = _tensor_specs(manifest["inputs"], "inputs", src)
    outputs = _tensor_specs(manifest["outputs"], "outputs", src)
    s = contract.image_size
    if [t.name for t in inputs] != [contract.input_name] or inputs[0].shape != (-1, 3, s, s):
        raise FormatError(
            f"{src}: engine inputs {[t.to_dict() for t in inputs]} do not match the contract "
            f"({contract.input_name!r} [-1, 3, {s}, {s}])"
        )
    expected: dict[str, tuple[int, ...]] = {
        lv.name: (-1, lv.height, lv.width, lv.channels) for lv in contract.levels
    }
    expected[contract.pooled_name] = (-1, contract.pooled_dim)
    got = {t.name: t.shape for t in outputs}
    if got != expected:
        raise FormatError(
            f"{src}: engine outputs {got} do not match the contract's channels-last outputs "
            f"{expected}"
        )
    return {
        "contract": contract,
        "fingerprint": fp,
        "inputs": inputs,
        "outputs": outputs,
    }


# ------------------------------------------------------------------------------ write / read


def build_manifest(
    *,
    contract: Contract,
    fingerprint: str,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str | tuple[int, int],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch: int,
    opt_batch: int | None = None,
    build: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    onnx_metadata: dict[str, str] | None = None,
    created: str | None = None,
) -> dict[str, Any]:
    """The manifest dict ``write_engine_file`` stores (exposed for tests and tools)."""
    return {
        "kind": ENGINE_KIND,
        "tool_version": __version__,
        "model_fingerprint": fingerprint,
        "contract": contract.to_dict(),
        "precision": contract.precision,
        "tensorrt_version": str(tensorrt_version),
        "gpu_name": str(gpu_name),
        "compute_capability": normalize_compute_capability(compute_capability),
        "max_batch": int(max_batch),
        "opt_batch": int(opt_batch if opt_batch is not None else max_batch),
        "inputs": [t.to_dict() for t in inputs],
        "outputs": [t.to_dict() for t in outputs],
        "build": dict(build or {}),
        "source": dict(source or {}),
        "onnx_metadata": dict(onnx_metadata or {}),
        "created": created or utc_timestamp(),
    }


def write_engine_file(
    path: str | Path,
    plan: bytes | bytearray | memoryview | np.ndarray,
    **manifest_fields: Any,
) -> None:
    """Validate the manifest, then write manifest + plan atomically (never a partial file).

    ``manifest_fields`` are the keyword arguments of :func:`build_manifest`.
    """
    p = Path(path)
    manifest = build_manifest(**manifest_fields)
    _validate(manifest, str(p))
    data = (
        np.ascontiguousarray(plan).reshape(-1).view(np.uint8)
        if isinstance(plan, np.ndarray)
        else np.frombuffer(memoryview(plan).cast("B"), np.uint8)
    )
    if data.size == 0:
        raise FormatError(f"{p}: refusing to write an engine file with an empty plan")
    write_container(p, ENGINE_MAGIC, ENGINE_FORMAT_VERSION, manifest, {PLAN_BLOB: data})


def read_engine_file(path: str | Path, verify: bool = False) -> EngineFile:
    """Open and validate an engine file (no TensorRT needed). FormatError on anything wrong."""
    p = Path(path)
    c = read_container(p, ENGINE_MAGIC, SUPPORTED_VERSIONS, verify=verify)
    try:
        parsed = _validate(c.manifest, str(p))
        info = c.blob_info.get(PLAN_BLOB)
        if info is None or info.dtype != "|u1" or len(info.shape) != 1 or info.nbytes == 0:
            raise FormatError(f"{p}: engine file has no non-empty uint8 blob {PLAN_BLOB!r}")
        extra = sorted(set(c.blob_info) - {PLAN_BLOB})
        if extra:
            raise FormatError(f"{p}: engine file has unexpected blobs {extra}")
    except BaseException:
        c.close()
        raise
    m = c.manifest
    return EngineFile(
        path=p,
        version=c.version,
        manifest=m,
        contract=parsed["contract"],
        fingerprint=parsed["fingerprint"],
        tensorrt_version=m["tensorrt_version"],
        gpu_name=m["gpu_name"],
        compute_capability=m["compute_capability"],
        precision=m["precision"],
        max_batch=m["max_batch"],
        opt_batch=m["opt_batch"],
        inputs=parsed["inputs"],
        outputs=parsed["outputs"],
        plan_nbytes=info.nbytes,
        _container=c,
    )


def describe(path: str | Path, verify: bool = False) -> dict[str, Any]:
    """Header summary for ``spade-inspect`` (JSON-serialisable; no TensorRT needed)."""
    with read_engine_file(path, verify=verify) as ef:
        c = ef.contract
        file_bytes = ef.path.stat().st_size
        return {
            "kind": "engine",
            "path": str(ef.path),
            "format_version": ef.version,
            "file_bytes": file_bytes,
            "plan_bytes": ef.plan_nbytes,
            "verified": bool(verify),
            "tool_version": ef.manifest["tool_version"],
            "created": ef.manifest["created"],
            "tensorrt_version": ef.tensorrt_version,
            "gpu_name": ef.gpu_name,
            "compute_capability": ef.compute_capability,
            "precision": ef.precision,
            "model_fingerprint": ef.fingerprint,
            "parent_fingerprint": ef.parent_fingerprint,
            **c.summary(),
            "max_batch": ef.max_batch,
            "opt_batch": ef.opt_batch,
            "inputs": [t.to_dict() for t in ef.inputs],
            "outputs": [t.to_dict() for t in ef.outputs],
            "build": ef.manifest["build"],
            "source": ef.manifest["source"],
            "onnx_metadata_keys": sorted(ef.metadata),
            "contract": c.to_dict(),
        }


def output_nbytes(spec: TensorSpec, batch: int) -> int:
    """Bytes of ``batch`` images of an output (for buffer sizing)."""
    return batch * math.prod(spec.per_image_shape) * np.dtype(spec.dtype).itemsize


__all__ = [
    "ENGINE_FORMAT_VERSION",
    "ENGINE_MAGIC",
    "EngineFile",
    "TensorSpec",
    "build_manifest",
    "check_tensorrt_version",
    "describe",
    "normalize_compute_capability",
    "output_nbytes",
    "read_engine_file",
    "tensorrt_version_key",
    "write_engine_file",
]
