"""Build a spade-edge TensorRT engine file from a spade-edge ONNX model (TensorRT 10.x / 11.x).

Why it works this way:

* **Strongly typed networks only.** TensorRT 11 removed the FP16/INT8 builder flags and the
  INT8 calibrators; precision must live in the ONNX. So the network is strongly typed on both
  majors (a creation flag on 10.x, always on in 11.x: see ``TRT_FEATURES`` in
  runtime/runners/trt.py) and the precision is whatever the ONNX says: fp32, an fp16-converted
  graph (fp32 I/O kept) or a Q/DQ graph (explicit INT8 quantization). The builder checks that
  the parsed network really matches ``Contract.precision`` (Q/DQ layers for int8, half tensors
  for fp16, neither for fp32) instead of trusting a label.
* **fp32 means fp32.** TF32 is cleared for every build unless ``tf32=True``: TensorRT enables it
  by default and it rounds fp32 matmul/conv inputs to 10 mantissa bits, which breaks the
  fp32 parity bound (rel < 1e-3 vs ONNX Runtime).
* **One optimization profile** for batch 1..max_batch; ``opt_batch`` defaults to
  ``max_batch`` (the line scores full batches; TensorRT still runs any B in range).
* **Reusable timing cache**: loaded if the file exists (a cache from another GPU/TensorRT is
  ignored with a warning), saved atomically after the build. Rebuilds drop from minutes to
  seconds.
* The result is an engine file (runtime/engine_file.py) that records the model fingerprint,
  contract, TensorRT version, GPU and compute capability, so the runtime can refuse a
  mismatch. ``raw_plan`` also writes the bare plan for ``trtexec --loadEngine`` users.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.contract import Contract
from spade_edge.runtime.engine_file import (
    MAX_BATCH_CAP,
    PRECISIONS,
    TensorSpec,
    write_engine_file,
)
from spade_edge.runtime.errors import ConfigError, ExportError, InputError
from spade_edge.runtime.fileio import file_sha256, write_atomic
from spade_edge.runtime.model_meta import read_model_info
from spade_edge.runtime.runners.trt import (
    CudaDevice,
    features_for,
    import_pycuda,
    import_tensorrt,
    make_logger,
    network_flags_mask,
)

log = logging.getLogger("spade_edge.trt")


@dataclass
class NetworkSummary:
    """What the parsed (strongly typed) network actually contains, for the precision check."""

    layers: int = 0
    qdq_layers: int = 0
    half_tensors: int = 0


@dataclass
class EngineInfo:
    """What ``build_engine`` produced (also printed by spade-export)."""

    engine_path: Path
    raw_plan: Path | None
    fingerprint: str
    precision: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    max_batch: int
    opt_batch: int
    plan_bytes: int
    seconds: float
    timing_cache: Path | None
    timing_cache_loaded: bool
    network: NetworkSummary = field(default_factory=NetworkSummary)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("engine_path", "raw_plan", "timing_cache"):
            d[k] = str(d[k]) if d[k] is not None else None
        return d


def _check_int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def summarize_network(trt: Any, network: Any) -> NetworkSummary:
    """Count Q/DQ layers and half-precision tensors of a parsed network."""
    qdq = {trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE}
    s = NetworkSummary(layers=int(network.num_layers))
    for i in range(s.layers):
        layer = network.get_layer(i)
        if layer.type in qdq:
            s.qdq_layers += 1
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype == trt.DataType.HALF:
                s.half_tensors += 1
    return s


def check_precision(contract: Contract, summary: NetworkSummary, source: str) -> None:
    """The graph must carry the precision its contract claims (a label alone is not trusted)."""
    p = contract.precision
    if p == "int8" and summary.qdq_layers == 0:
        raise ExportError(
            f"{source}: contract says int8 but the graph has no Q/DQ layers; quantize it with "
            "spade-export --precision int8 --calib-dir NORMAL_IMAGES"
        )
    if p == "fp16" and summary.half_tensors == 0:
        raise ExportError(
            f"{source}: contract says fp16 but the graph has no half-precision tensors; convert "
            "it with spade-export --precision fp16"
        )
    if p == "fp32" and (summary.qdq_layers or summary.half_tensors):
        raise ExportError(
            f"{source}: contract says fp32 but the graph has {summary.qdq_layers} Q/DQ layers "
            f"and {summary.half_tensors} half tensors; its contract is wrong, re-export it"
        )


def _io_specs(
    trt: Any, network: Any, contract: Contract, source: str
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input/output specs of the parsed network, checked against the contract."""
    s = contract.image_size
    if network.num_inputs != 1:
        raise ExportError(f"{source}: expected 1 input, the network has {network.num_inputs}")
    t_in = network.get_input(0)
    in_shape = _dims(t_in.shape)
    if t_in.name != contract.input_name or len(in_shape) != 4 or in_shape[1:] != (3, s, s):
        raise ExportError(
            f"{source}: input {t_in.name!r} {list(in_shape)} does not match the contract "
            f"({contract.input_name!r} [B, 3, {s}, {s}])"
        )
    if in_shape[0] != -1:
        raise ExportError(
            f"{source}: input batch is fixed at {in_shape[0]}; re-export with a dynamic batch"
        )

    def dt(t: Any) -> str:
        return np.dtype(trt.nptype(t.dtype)).name

    inputs = [TensorSpec(t_in.name, dt(t_in), (-1, 3, s, s))]
    expected: dict[str, tuple[int, ...]] = {
        lv.name: (lv.height, lv.width, lv.channels) for lv in contract.levels
    }
    expected[contract.pooled_name] = (contract.pooled_dim,)
    found: dict[str, Any] = {}
    for i in range(network.num_outputs):
        t = network.get_output(i)
        found[t.name] = t
    if set(found) != set(expected):
        raise ExportError(
            f"{source}: network outputs {sorted(found)} differ from the contract's "
            f"{sorted(expected)}"
        )
    outputs = []
    for name in contract.output_names:
        t = found[name]
        dims = _dims(t.shape)
        want = expected[name]
        if len(dims) != len(want) + 1 or any(
            d >= 0 and d != w for d, w in zip(dims[1:], want, strict=True)
        ):
            raise ExportError(
                f"{source}: output {name!r} has shape {list(dims)}, the contract says "
                f"[B, {', '.join(map(str, want))}] (channels-last)"
            )
        outputs.append(TensorSpec(name, dt(t), (-1, *want)))
    return inputs, outputs


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    max_batch: int = 8,
    workspace_mb: int | None = None,
    timing_cache: Path | None = None,
    raw_plan: Path | None = None,
    *,
    opt_batch: int | None = None,
    device: int = 0,
    tf32: bool = False,
    verbose: bool = False,
) -> EngineInfo:
    """Build ``engine_path`` (spade-edge engine file) from a spade-edge ONNX on GPU ``device``.

    Raises InputError/FormatError for a bad ONNX, ConfigError for bad options,
    BackendUnavailableError when TensorRT/pycuda/GPU are missing, ExportError when TensorRT
    cannot parse or build. Nothing is written unless the build succeeded.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    max_batch = _check_int(max_batch, "max_batch", 1, MAX_BATCH_CAP)
    opt = _check_int(opt_batch if opt_batch is not None else max_batch, "opt_batch", 1, max_batch)
    if workspace_mb is not None:
        workspace_mb = _check_int(workspace_mb, "workspace_mb", 1, 1 << 20)
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: ONNX model not found")
    if not engine_path.parent.is_dir():
        raise InputError(f"{engine_path.parent}: output folder does not exist")
    info = read_model_info(onnx_path)  # FormatError for a non-spade-edge model
    contract, fingerprint = info.contract, info.fingerprint
    if contract.precision not in PRECISIONS:
        raise ExportError(f"{onnx_path}: unknown contract precision {contract.precision!r}")
    if contract.extra.get("quantization", {}).get("target") == "cpu":
        raise ExportError(
            f"{onnx_path}: INT8 model quantized for ONNX Runtime CPU (uint8 activations, int32 "
            "bias), which TensorRT cannot build; re-quantize with --int8-target trt"
        )

    opts = BuildOptions(max_batch, opt, workspace_mb, timing_cache, tf32, verbose)
    trt = import_tensorrt()
    features = features_for(trt.__version__)
    cuda = import_pycuda("the TensorRT engine builder")
    gpu = CudaDevice.open(cuda, device)
    try:
        with gpu.active():
            built = BuildPlan(trt, features, gpu, onnx_path, contract, opts)()
    finally:
        gpu.release()
    plan = built.plan
    # what the engine is and was built for: written to its manifest and reported, both from here
    identity: dict[str, Any] = {
        "fingerprint": fingerprint,
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu.name,
        "compute_capability": gpu.compute_capability,
        "max_batch": max_batch,
        "opt_batch": opt,
    }
    write_engine_file(
        engine_path,
        plan,
        contract=contract,
        inputs=built.inputs,
        outputs=built.outputs,
        build=built.meta,
        source={"onnx_name": onnx_path.name, "onnx_sha256": file_sha256(onnx_path, ExportError)},
        onnx_metadata=dict(info.metadata),
        **identity,
    )
    if raw_plan is not None:
        write_atomic(Path(raw_plan), plan)
    return EngineInfo(
        engine_path=engine_path,
        raw_plan=Path(raw_plan) if raw_plan is not None else None,
        precision=contract.precision,
        plan_bytes=len(plan),
        seconds=built.seconds,
        timing_cache=Path(timing_cache) if timing_cache is not None else None,
        timing_cache_loaded=built.timing_cache_loaded,
        network=built.network,
        **identity,
    )


@dataclass(frozen=True)
class BuildOptions:
    """The checked build settings (``build_engine`` validates them)."""

    max_batch: int
    opt_batch: int
    workspace_mb: int | None
    timing_cache: Path | None
    tf32: bool
    verbose: bool


@dataclass
class BuiltPlan:
    """What the TensorRT part of a build produced."""

    plan: bytes
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    network: NetworkSummary
    seconds: float
    timing_cache_loaded: bool
    meta: dict[str, Any]


@dataclass
class ParsedNetwork:
    """Builder, strongly typed network (parsed from the ONNX) and the logger they share."""

    builder: Any
    network: Any
    logger: Any
    summary: NetworkSummary
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def parse_network(
    trt: Any, features: Any, onnx_path: Path, contract: Contract, verbose: bool
) -> ParsedNetwork:
    """Loader 1: parse the ONNX into a strongly typed network and check it against the
    contract (precision actually present, I/O names and shapes)."""
    logger = make_logger(trt, verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags_mask(trt, features))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            errs.append(f"{e.node_name() or '?'}: {e.desc()}")
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        first = errs[0] if errs else logger.last_errors()
        raise ExportError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse it: {first}{more}")
    summary = summarize_network(trt, network)
    check_precision(contract, summary, str(onnx_path))
    inputs, outputs = _io_specs(trt, network, contract, str(onnx_path))
    return ParsedNetwork(builder, network, logger, summary, inputs, outputs)


def make_config(
    trt: Any, features: Any, builder: Any, contract: Contract, opts: BuildOptions
) -> tuple[Any, list[str]]:
    """Loader 2: builder config (workspace, TF32 cleared unless allowed, one batch profile).
    Returns the config and the builder flags it cleared."""
    config = builder.create_builder_config()
    if opts.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    cleared = []
    if not opts.tf32:
        for name in features.strict_fp32_clear:
            config.clear_flag(getattr(trt.BuilderFlag, name))
            cleared.append(name)
    s = contract.image_size
    profile = builder.create_optimization_profile()
    profile.set_shape(
        contract.input_name,
        (1, 3, s, s),
        (opts.opt_batch, 3, s, s),
        (opts.max_batch, 3, s, s),
    )
    config.add_optimization_profile(profile)
    return config, cleared


def load_timing_cache(config: Any, path: Path | None) -> bool:
    """Loader 3: attach the timing cache at ``path`` (a fresh one if it is missing or was made
    for another GPU/TensorRT). Returns whether a stored cache was loaded."""
    if path is None:
        return False
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError as e:
        raise InputError(f"{path}: cannot read timing cache: {e.strerror}") from None
    cache = config.create_timing_cache(data)
    if config.set_timing_cache(cache, False):
        return bool(data)
    log.warning("%s: timing cache was made for another GPU/TensorRT; starting afresh", path)
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return False


@dataclass
class BuildPlan:
    """The TensorRT part of a build as composed loaders (Polygraphy's model): parse ->
    configure -> timing cache -> build -> save the cache. Call it inside the device's context."""

    trt: Any
    features: Any
    gpu: CudaDevice
    onnx_path: Path
    contract: Contract
    opts: BuildOptions

    def __call__(self) -> BuiltPlan:
        trt, opts = self.trt, self.opts
        cache_path = Path(opts.timing_cache) if opts.timing_cache is not None else None
        net = parse_network(trt, self.features, self.onnx_path, self.contract, opts.verbose)
        config, cleared = make_config(trt, self.features, net.builder, self.contract, opts)
        cache_loaded = load_timing_cache(config, cache_path)
        t0 = time.perf_counter()
        serialized = net.builder.build_serialized_network(net.network, config)
        seconds = time.perf_counter() - t0
        if serialized is None or int(serialized.nbytes) == 0:
            raise ExportError(
                f"{self.onnx_path}: TensorRT {trt.__version__} failed to build the engine on "
                f"{self.gpu.name}: {net.logger.last_errors()}"
            )
        plan = bytes(memoryview(serialized).cast("B"))
        if cache_path is not None:
            write_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))
        meta = {
            "strongly_typed": True,
            "network_flags": list(self.features.network_flags),
            "cleared_builder_flags": cleared,
            "workspace_mb": opts.workspace_mb,
            "timing_cache": cache_path.name if cache_path is not None else None,
            "timing_cache_loaded": cache_loaded,
            "build_seconds": round(seconds, 3),
            "network": asdict(net.summary),
            "device_index": self.gpu.index,
        }
        return BuiltPlan(plan, net.inputs, net.outputs, net.summary, seconds, cache_loaded, meta)


__all__ = ["EngineInfo", "NetworkSummary", "build_engine", "check_precision", "summarize_network"]
