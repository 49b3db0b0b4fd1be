"""TensorRT runner (10.x on JetPack 6 and 11.x on servers) plus the TensorRT plumbing it shares
with the engine builder (export/trt_build.py): import with a clear error, the version table,
a logger that keeps errors for messages, and ``TRT_API`` (the CUDA device/context helper is
runtime/gpu.py, shared with the CUDA matcher).

Why the runner looks like this:

* The engine file (runtime/engine_file.py) is read and checked **before** TensorRT sees the
  plan: wrong TensorRT version or GPU architecture is a :class:`CompatibilityError` naming both
  sides, not a crash inside ``deserialize_cuda_engine``.
* I/O is bound with the name-based tensor API (``set_input_shape`` / ``set_tensor_address`` /
  ``execute_async_v3``), the only one left in TensorRT 10 and 11.
* Device and pinned host buffers are allocated once for ``max_batch`` images and their
  addresses bound once; ``infer`` only copies the input, sets the shape when B changes,
  enqueues and synchronises. Outputs stay on the device (``Features.device``) for the CUDA
  matcher; ``to_host()`` copies them back for the NumPy matcher.
* pycuda works in the device's *primary* context, the one the CUDA runtime inside TensorRT
  uses, so pointers are valid for TensorRT, pycuda and any other primary-context user.

``TRT_API`` lists every TensorRT name this module and export/trt_build.py touch (with the number
of positional arguments of each call); tests/test_trt_api.py checks it against snapshots of the
real 10.x and 11.x bindings and checks that the code uses no TensorRT name missing from it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from spade_edge.runtime.engine_file import (
    EngineFile,
    read_engine_file,
    tensorrt_version_key,
)
from spade_edge.runtime.errors import (
    BackendUnavailableError,
    ConfigError,
    FormatError,
    InputError,
    SpadeError,
)
from spade_edge.runtime.gpu import CudaDevice, import_pycuda
from spade_edge.runtime.registry import Backend
from spade_edge.runtime.runners.base import Features, check_batch

log = logging.getLogger("spade_edge.trt")

INSTALL_HINT = (
    "install it with pip install 'spade-edge[trt]' (x86/server: TensorRT + pycuda wheels), or on "
    "Jetson use the TensorRT that JetPack ships (apt install nvidia-jetpack / python3-libnvinfer, "
    "with the venv created using --system-site-packages) plus pip install pycuda"
)

#: Every TensorRT name spade-edge touches: "Class.member/N" (N = positional args of the call,
#: self excluded), "Class.member" (property / enum value), "function/N". Checked against the
#: real bindings of 10.3, 10.16, 11.0 and 11.4 by tests/test_trt_api.py.
TRT_API: tuple[str, ...] = (
    "__version__",
    "nptype/1",
    # logging
    "ILogger.__init__/0",
    "ILogger.log/2",
    "ILogger.Severity",
    "ILogger.Severity.ERROR",
    "ILogger.Severity.WARNING",
    "ILogger.Severity.INFO",
    # network + parser (export/trt_build.py)
    "Builder.__init__/1",
    "Builder.create_network/1",
    "Builder.create_builder_config/0",
    "Builder.create_optimization_profile/0",
    "Builder.build_serialized_network/2",
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
    "OnnxParser.__init__/2",
    "OnnxParser.parse_from_file/1",
    "OnnxParser.num_errors",
    "OnnxParser.get_error/1",
    "ParserError.desc/0",
    "ParserError.node_name/0",
    "INetworkDefinition.num_inputs",
    "INetworkDefinition.num_outputs",
    "INetworkDefinition.get_input/1",
    "INetworkDefinition.get_output/1",
    "INetworkDefinition.num_layers",
    "INetworkDefinition.get_layer/1",
    "ILayer.type",
    "ILayer.num_outputs",
    "ILayer.get_output/1",
    "ITensor.name",
    "ITensor.shape",
    "ITensor.dtype",
    "LayerType.QUANTIZE",
    "LayerType.DEQUANTIZE",
    "DataType.HALF",
    # builder config
    "IBuilderConfig.set_memory_pool_limit/2",
    "MemoryPoolType.WORKSPACE",
    "IBuilderConfig.clear_flag/1",
    "BuilderFlag.TF32",
    "IOptimizationProfile.set_shape/4",
    "IBuilderConfig.add_optimization_profile/1",
    "IBuilderConfig.create_timing_cache/1",
    "IBuilderConfig.set_timing_cache/2",
    "IBuilderConfig.get_timing_cache/0",
    "ITimingCache.serialize/0",
    "IHostMemory.nbytes",
    # runtime (this module)
    "Runtime.__init__/1",
    "Runtime.deserialize_cuda_engine/1",
    "ICudaEngine.num_io_tensors",
    "ICudaEngine.get_tensor_name/1",
    "ICudaEngine.get_tensor_mode/1",
    "ICudaEngine.get_tensor_dtype/1",
    "ICudaEngine.get_tensor_profile_shape/2",
    "ICudaEngine.create_execution_context/0",
    "TensorIOMode.INPUT",
    "TensorIOMode.OUTPUT",
    "IExecutionContext.set_input_shape/2",
    "IExecutionContext.set_tensor_address/2",
    "IExecutionContext.execute_async_v3/1",
)


# ------------------------------------------------------------------------------ versions


@dataclass(frozen=True)
class TrtFeatures:
    """What differs between TensorRT majors, in one row per major (no scattered ifs).

    ``network_flags``: NetworkDefinitionCreationFlag members to set for a strongly typed
    network. ``strict_fp32_clear``: BuilderFlag members cleared unless TF32 is allowed, so
    an fp32 contract computes in fp32. Precision itself never comes from builder flags: it is
    in the ONNX (fp16-converted or Q/DQ), which is the only way 11.x supports.
    """

    major: int
    network_flags: tuple[str, ...]
    strict_fp32_clear: tuple[str, ...]
    note: str


TRT_FEATURES: dict[int, TrtFeatures] = {
    10: TrtFeatures(
        10,
        network_flags=("STRONGLY_TYPED",),
        strict_fp32_clear=("TF32",),
        note="strong typing is opt-in via NetworkDefinitionCreationFlag.STRONGLY_TYPED",
    ),
    11: TrtFeatures(
        11,
        network_flags=(),
        strict_fp32_clear=("TF32",),
        note="strong typing is always on (STRONGLY_TYPED is deprecated and ignored); "
        "FP16/INT8 builder flags and calibrators are removed",
    ),
}


def features_for(version: str) -> TrtFeatures:
    """The table row for a TensorRT version; newer majors use the newest row (and say so)."""
    major = tensorrt_version_key(version)[0]
    if major in TRT_FEATURES:
        return TRT_FEATURES[major]
    newest = max(TRT_FEATURES)
    if major > newest:
        log.warning(
            "TensorRT %s is newer than the versions spade-edge knows; using %d.x rules",
            version,
            newest,
        )
        return replace(TRT_FEATURES[newest], major=major)
    raise BackendUnavailableError(
        f"TensorRT {version} is too old: spade-edge needs TensorRT 10.x or 11.x; {INSTALL_HINT}"
    )


def import_tensorrt() -> Any:  # TensorRT's bindings ship no type information
    """``import tensorrt`` or a BackendUnavailableError that says what to install."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:
        raise BackendUnavailableError(
            f"TensorRT cannot be imported here ({e}); {INSTALL_HINT}"
        ) from None
    if not isinstance(getattr(trt, "__version__", None), str):
        raise BackendUnavailableError(f"the 'tensorrt' module here has no version; {INSTALL_HINT}")
    return trt


def network_flags_mask(trt: ModuleType, features: TrtFeatures) -> int:
    """Bit mask for ``Builder.create_network`` from the table's flag names."""
    mask = 0
    for name in features.network_flags:
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is None:
            raise BackendUnavailableError(
                f"TensorRT {trt.__version__} lacks NetworkDefinitionCreationFlag.{name}"
            )
        mask |= 1 << int(flag)
    return mask


def make_logger(trt: ModuleType, verbose: bool = False) -> Any:
    """A TensorRT logger that forwards to ``logging`` and keeps errors for our messages."""
    severity = trt.ILogger.Severity
    error_level = int(severity.ERROR)
    warning_level = int(severity.WARNING)
    info_level = int(severity.INFO)

    class _Logger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, sev: Any, msg: str) -> None:
            level = int(sev)
            if level <= error_level:
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif level == warning_level:
                log.warning("TensorRT: %s", msg)
            elif verbose or level == info_level:
                log.debug("TensorRT: %s", msg)

        def last_errors(self, n: int = 3) -> str:
            return " | ".join(self.errors[-n:]) if self.errors else "no error logged"

    return _Logger()


# ------------------------------------------------------------------------------ runner


def _np_dtype_name(trt: ModuleType, dtype: Any) -> str:
    return str(np.dtype(trt.nptype(dtype)).name)


class TrtRunner(Backend):
    """Runs a spade-edge engine file with TensorRT; outputs stay on the GPU (Features.device)."""

    name = "trt"
    thread_safe = False  # one set of bound I/O buffers and one stream

    def __init__(
        self,
        path: str | Path,
        device: int = 0,
        max_batch: int | None = None,
        verbose: bool = False,
    ) -> None:
        self.path = Path(path)
        self._closed = False
        self._gpu: CudaDevice | None = None
        self._d_in: Any = None
        self._d_out: dict[str, Any] = {}
        self._context: Any = None
        self._engine: Any = None
        self._runtime: Any = None
        # 1. the file (no TensorRT needed): FormatError / InputError for anything wrong
        ef = read_engine_file(self.path)
        try:
            self.engine_file_manifest = ef.manifest
            # the source ONNX's metadata: lineage of derived models (gallery reuse decision)
            self.metadata = ef.metadata
            self.contract = ef.contract
            self.fingerprint = ef.fingerprint
            self.parent_fingerprint = ef.parent_fingerprint
            self.precision = ef.precision
            if max_batch is not None and (
                isinstance(max_batch, bool)
                or not isinstance(max_batch, int)
                or not 1 <= max_batch <= ef.max_batch
            ):
                raise ConfigError(
                    f"{self.path}: max_batch {max_batch!r} must be in 1..{ef.max_batch} "
                    f"(the engine was built with --max-batch {ef.max_batch})"
                )
            self.max_batch: int | None = max_batch or ef.max_batch
            # 2. the backend: BackendUnavailableError with an install hint
            trt = import_tensorrt()
            self._trt = trt
            self.features = features_for(trt.__version__)
            cuda = import_pycuda("the TensorRT runner")
            self._cuda = cuda
            self._gpu = CudaDevice.open(cuda, device)
            # 3. compatibility: CompatibilityError naming both sides
            ef.check_runtime(trt.__version__, self._gpu.compute_capability, self._gpu.name)
            with self._gpu.active():
                self._setup(trt, cuda, ef, verbose)
        except BaseException:
            self.close()
            raise
        finally:
            ef.close()

    # -- setup ------------------------------------------------------------------------

    def _setup(self, trt: ModuleType, cuda: ModuleType, ef: EngineFile, verbose: bool) -> None:
        self._logger = make_logger(trt, verbose)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(ef.plan())
        if engine is None:
            raise FormatError(
                f"{self.path}: TensorRT {trt.__version__} could not deserialize the plan "
                f"({self._logger.last_errors()})"
            )
        self._engine = engine
        self._check_io(trt, ef)
        self._context = engine.create_execution_context()
        if self._context is None:
            raise BackendUnavailableError(
                f"{self.path}: TensorRT could not create an execution context "
                f"(out of GPU memory?) ({self._logger.last_errors()})"
            )
        b = int(self.max_batch or 1)
        spec_in = ef.inputs[0]
        self._input_name = spec_in.name
        self._h_in = cuda.pagelocked_empty((b, *spec_in.per_image_shape), np.dtype(spec_in.dtype))
        self._d_in = cuda.mem_alloc(self._h_in.nbytes)
        self._bind(self._input_name, self._d_in)
        c = self.contract
        self._out_names = c.output_names
        specs = {t.name: t for t in ef.outputs}
        self._h_out: dict[str, np.ndarray] = {}
        for name in self._out_names:
            spec = specs[name]
            host = cuda.pagelocked_empty((b, *spec.per_image_shape), np.dtype(spec.dtype))
            self._h_out[name] = host
            self._d_out[name] = cuda.mem_alloc(max(host.nbytes, 1))
            self._bind(name, self._d_out[name])
        self._dtypes = tuple(str(specs[n].dtype) for n in self._out_names)
        self._stream = cuda.Stream()
        self._last_batch = 0
        self._generation = 0

    def _bind(self, name: str, buf: Any) -> None:
        if not self._context.set_tensor_address(name, int(buf)):
            raise FormatError(f"{self.path}: TensorRT refused an address for tensor {name!r}")

    def _check_io(self, trt: ModuleType, ef: EngineFile) -> None:
        """The deserialized engine must have exactly the manifest's I/O (names, modes, dtypes)."""
        eng = self._engine
        got: dict[str, tuple[str, str]] = {}
        for i in range(eng.num_io_tensors):
            n = eng.get_tensor_name(i)
            mode = eng.get_tensor_mode(n)
            kind = {trt.TensorIOMode.INPUT: "input", trt.TensorIOMode.OUTPUT: "output"}.get(mode)
            got[n] = (kind or str(mode), _np_dtype_name(trt, eng.get_tensor_dtype(n)))
        want = {t.name: ("input", t.dtype) for t in ef.inputs}
        want.update({t.name: ("output", t.dtype) for t in ef.outputs})
        if got != want:
            raise FormatError(
                f"{self.path}: the plan's I/O tensors {got} differ from its manifest {want}"
            )
        profile = eng.get_tensor_profile_shape(ef.inputs[0].name, 0)
        plan_max = int(profile[2][0])
        if plan_max != ef.max_batch:
            raise FormatError(
                f"{self.path}: the plan's max batch {plan_max} differs from its manifest "
                f"({ef.max_batch})"
            )

    # -- inference --------------------------------------------------------------------

    def infer(self, batch: np.ndarray) -> Features:
        """Run a float32 [B,3,S,S] batch; returns device Features valid until the next infer."""
        if self._closed:
            raise InputError(f"{self.path}: runner is closed")
        s = self.contract.image_size
        batch = check_batch(batch, self.contract)
        n = int(batch.shape[0])
        mb = int(self.max_batch or 0)
        if not 1 <= n <= mb:
            raise InputError(
                f"batch of {n} images is outside the engine's range 1..{mb} "
                f"({self.path.name} was built with --max-batch {mb})"
            )
        cuda = self._cuda
        assert self._gpu is not None
        with self._gpu.active():
            np.copyto(self._h_in[:n], batch, casting="same_kind")
            cuda.memcpy_htod_async(self._d_in, self._h_in[:n], self._stream)
            if n != self._last_batch:
                if not self._context.set_input_shape(self._input_name, (n, 3, s, s)):
                    raise InputError(
                        f"{self.path}: TensorRT refused input shape ({n}, 3, {s}, {s})"
                    )
                self._last_batch = n
            if not self._context.execute_async_v3(self._stream.handle):
                raise SpadeError(
                    f"{self.path}: TensorRT execution failed ({self._logger.last_errors()})"
                )
            self._stream.synchronize()
        self._generation += 1
        gen = self._generation
        outs = [self._d_out[name] for name in self._out_names]
        return Features(
            levels=outs[:-1],
            pooled=outs[-1],
            batch=n,
            device=True,
            dtypes=self._dtypes,
            _to_host=lambda: self._to_host(n, gen),
        )

    def _to_host(self, n: int, generation: int) -> Features:
        """Copy the outputs of infer #generation back (refused if a later infer overwrote them)."""
        if self._closed:
            raise InputError(f"{self.path}: runner is closed; features are gone")
        if generation != self._generation:
            raise SpadeError(
                f"{self.path}: these device features were overwritten by a later infer(); "
                "call to_host() before running the next batch"
            )
        cuda = self._cuda
        assert self._gpu is not None
        with self._gpu.active():
            for name in self._out_names:
                cuda.memcpy_dtoh_async(self._h_out[name][:n], self._d_out[name], self._stream)
            self._stream.synchronize()
        host = [np.array(self._h_out[name][:n], dtype=np.float32) for name in self._out_names]
        return Features(levels=host[:-1], pooled=host[-1].reshape(n, -1), batch=n)

    def device_nbytes(self) -> int:
        """Bytes of the I/O buffers this runner holds on the GPU (activations not included)."""
        return int(
            self._h_in.nbytes + sum(math.prod(h.shape) * h.itemsize for h in self._h_out.values())
        )

    def close(self) -> None:
        """Free buffers, context, engine (in that order) and release the primary context."""
        if self._closed:
            return
        self._closed = True
        gpu = self._gpu
        bufs = [self._d_in, *self._d_out.values()]
        self._d_in, self._d_out = None, {}
        ctx_cm = gpu.active() if gpu is not None else contextlib.nullcontext()
        with contextlib.suppress(Exception), ctx_cm:
            for b in bufs:
                if b is not None:
                    b.free()
            self._context = None
            self._engine = None
            self._runtime = None
        if gpu is not None:
            gpu.release()
            self._gpu = None

    def __del__(self) -> None:  # best effort; explicit close() is the contract
        with contextlib.suppress(Exception):
            if not getattr(self, "_closed", True):
                self.close()


__all__ = [
    "INSTALL_HINT",
    "TRT_API",
    "TRT_FEATURES",
    "CudaDevice",
    "TrtFeatures",
    "TrtRunner",
    "features_for",
    "import_pycuda",
    "import_tensorrt",
    "make_logger",
    "network_flags_mask",
]
