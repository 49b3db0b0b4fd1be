"""A strict in-process fake of ``tensorrt`` (with the fake ``pycuda``) for CI: no TensorRT, no GPU.

Why: spade-edge's engine builder and TensorRT runner are mostly *our* logic (contract checks,
precision check, profile, timing cache, engine file, buffer sizing and slicing, batch-shape
caching, context push/pop, stale-feature guard). These fakes let that logic run end to end on
the CPU. They are NOT TensorRT:

* Every enum is generated from the snapshot of the real bindings of the chosen version (so
  ``BuilderFlag.FP16`` does not exist in the 11.x fake, enum values are the real ones), and
  ``check_against_snapshot`` (run by tests) proves each fake class only offers members the
  real class has. A call to an API the real bindings lack fails here too.
* The "engine" runs the ONNX with ONNX Runtime CPU and writes the outputs into fake device
  memory at the bound addresses, so a wrong offset, size, dtype or stale binding in the runner
  shows up as wrong numbers.
* Device memory copies and TensorRT calls that need a CUDA context refuse to run unless a
  context has been pushed, which checks the runner's primary-context discipline.
"""

from __future__ import annotations

import base64
import enum
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge_testing import fake_pycuda
from spade_edge_testing.fake_pycuda import FakeGpu
from spade_edge_testing.trt_snapshot import SNAP_DIR


def load_snapshot(version: str) -> dict[str, Any]:
    return json.loads((SNAP_DIR / f"trt-{version}.json").read_text())


@dataclass
class World(FakeGpu):
    """One fake GPU (``fake_pycuda.FakeGpu``) + fake TensorRT's counters (inspected by tests)."""

    set_input_shape_calls: int = 0
    executions: int = 0
    builds: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------ tensorrt


def _enum(snapshot: dict[str, Any], name: str) -> type[enum.IntEnum]:
    values = snapshot["enums"][name]
    return enum.IntEnum(name.rpartition(".")[2], values)  # type: ignore[return-value]


_ONNX_TO_DT = {1: "FLOAT", 10: "HALF", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8"}
_DT_TO_NP = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}


def make_fake_tensorrt(version: str, world: World) -> types.ModuleType:
    """A fake ``tensorrt`` module of the given snapshot version, bound to ``world``."""
    snap = load_snapshot(version)
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    DataType = _enum(snap, "DataType")
    LayerType = _enum(snap, "LayerType")
    TensorIOMode = _enum(snap, "TensorIOMode")
    BuilderFlag = _enum(snap, "BuilderFlag")
    MemoryPoolType = _enum(snap, "MemoryPoolType")
    NetworkDefinitionCreationFlag = _enum(snap, "NetworkDefinitionCreationFlag")
    strongly_flag = int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # type: ignore[attr-defined]
    major = int(version.split(".")[0])

    def nptype(trt_type: Any) -> type:
        return _DT_TO_NP[DataType(trt_type).name]

    class ILogger:
        _real = "ILogger"
        Severity = _enum(snap, "ILogger.Severity")

        def __init__(self) -> None:
            pass

    def _log(logger: Any, sev: str, msg: str) -> None:
        logger.log(ILogger.Severity[sev], msg)

    class ITensor:
        _real = "ITensor"

        def __init__(self, name: str, shape: tuple[int, ...], dtype: Any) -> None:
            self._name, self._shape, self._dtype = name, shape, dtype

        name = property(lambda self: self._name)
        shape = property(lambda self: self._shape)
        dtype = property(lambda self: self._dtype)

    class ILayer:
        _real = "ILayer"

        def __init__(self, type_: Any, outputs: list[ITensor]) -> None:
            self._type, self._outputs = type_, outputs

        type = property(lambda self: self._type)
        num_outputs = property(lambda self: len(self._outputs))

        def get_output(self, index: int) -> ITensor:
            return self._outputs[index]

    class INetworkDefinition:
        _real = "INetworkDefinition"

        def __init__(self, flags: int) -> None:
            self._flags = flags
            self._inputs: list[ITensor] = []
            self._outputs: list[ITensor] = []
            self._layers: list[ILayer] = []
            self._model: bytes = b""

        num_inputs = property(lambda self: len(self._inputs))
        num_outputs = property(lambda self: len(self._outputs))
        num_layers = property(lambda self: len(self._layers))

        def get_input(self, index: int) -> ITensor:
            return self._inputs[index]

        def get_output(self, index: int) -> ITensor:
            return self._outputs[index]

        def get_layer(self, index: int) -> ILayer:
            return self._layers[index]

    class ParserError:
        _real = "ParserError"

        def __init__(self, desc: str, node_name: str) -> None:
            self._desc, self._node = desc, node_name

        def desc(self) -> str:
            return self._desc

        def node_name(self) -> str:
            return self._node

    class OnnxParser:
        _real = "OnnxParser"

        def __init__(self, network: INetworkDefinition, logger: Any) -> None:
            self._net, self._logger = network, logger
            self._errors: list[ParserError] = []

        num_errors = property(lambda self: len(self._errors))

        def get_error(self, index: int) -> ParserError:
            return self._errors[index]

        def parse_from_file(self, model: str) -> bool:
            import onnx

            try:
                m = onnx.load(model)
                inferred = onnx.shape_inference.infer_shapes(m)
            except Exception as e:
                self._errors.append(ParserError(f"cannot read ONNX: {e}", ""))
                return False
            g = inferred.graph
            types_: dict[str, int] = {}
            for vi in [*g.input, *g.output, *g.value_info]:
                types_[vi.name] = vi.type.tensor_type.elem_type
            for init in g.initializer:
                types_[init.name] = init.data_type
            unsupported = [n for n in g.node if n.op_type.startswith("Unsupported")]
            if unsupported:
                n = unsupported[0]
                self._errors.append(ParserError(f"no importer for op {n.op_type}", n.name))
                return False

            def tensor(vi: Any) -> ITensor:
                dims = tuple(
                    d.dim_value if d.HasField("dim_value") else -1
                    for d in vi.type.tensor_type.shape.dim
                )
                return ITensor(vi.name, dims, DataType[_ONNX_TO_DT[vi.type.tensor_type.elem_type]])

            inits = {i.name for i in g.initializer}
            net = self._net
            net._inputs = [tensor(vi) for vi in g.input if vi.name not in inits]
            net._outputs = [tensor(vi) for vi in g.output]
            for node in g.node:
                kind = {"QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE"}.get(
                    node.op_type, "CONVOLUTION"
                )
                outs = [
                    ITensor(o, (), DataType[_ONNX_TO_DT.get(types_.get(o, 1), "FLOAT")])
                    for o in node.output
                ]
                net._layers.append(ILayer(LayerType[kind], outs))
            net._model = Path(model).read_bytes()
            return True

    class IOptimizationProfile:
        _real = "IOptimizationProfile"

        def __init__(self) -> None:
            self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
            self.shapes[input] = (tuple(min), tuple(opt), tuple(max))

    class IHostMemory(bytes):
        _real = "IHostMemory"
        nbytes = property(lambda self: len(self))

    class ITimingCache:
        _real = "ITimingCache"

        def __init__(self, data: dict[str, Any]) -> None:
            self.data = data

        def serialize(self) -> IHostMemory:
            return IHostMemory(json.dumps(self.data).encode())

    class IBuilderConfig:
        _real = "IBuilderConfig"

        def __init__(self) -> None:
            self.pools: dict[Any, int] = {}
            self.cleared: list[Any] = []
            self.profiles: list[IOptimizationProfile] = []
            self.cache: ITimingCache | None = None

        def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
            self.pools[MemoryPoolType(pool)] = int(pool_size)

        def clear_flag(self, flag: Any) -> None:
            self.cleared.append(BuilderFlag(flag).name)

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache:
            raw = bytes(memoryview(serialized_timing_cache))
            try:
                data = json.loads(raw) if raw else {"device": None, "entries": 0}
            except ValueError:
                data = {"device": "corrupt", "entries": 0}
            return ITimingCache(data)

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            here = f"{world.gpu_name}/{version}"
            if cache.data["device"] not in (None, here) and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self.cache

    class Builder:
        _real = "Builder"

        def __init__(self, logger: Any) -> None:
            world.need_context("Builder()")
            self._logger = logger

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(
            self, network: INetworkDefinition, config: IBuilderConfig
        ) -> IHostMemory | None:
            world.need_context("build_serialized_network")
            inp = network._inputs[0]
            prof = [p.shapes[inp.name] for p in config.profiles if inp.name in p.shapes]
            if inp.shape[0] == -1 and not prof:
                _log(self._logger, "ERROR", f"dynamic input {inp.name} has no profile")
                return None
            strongly = major >= 11 or bool(network._flags & (1 << strongly_flag))
            record = {
                "version": version,
                "strongly_typed": strongly,
                "flags": network._flags,
                "cleared": list(config.cleared),
                "pools": {MemoryPoolType(k).name: v for k, v in config.pools.items()},
                "profile": [list(x) for x in prof[0]] if prof else None,
            }
            world.builds.append(record)
            if config.cache is not None:
                config.cache.data = {
                    "device": f"{world.gpu_name}/{version}",
                    "entries": config.cache.data.get("entries", 0) + len(network._layers),
                }

            def io(t: ITensor) -> list[Any]:
                return [t.name, list(t.shape), DataType(t.dtype).name]

            plan = {
                "fake_tensorrt": version,
                "model": base64.b64encode(network._model).decode(),
                "inputs": [io(t) for t in network._inputs],
                "outputs": [io(t) for t in network._outputs],
                "profile": prof[0] if prof else None,
            }
            return IHostMemory(json.dumps(plan).encode())

    class IExecutionContext:
        _real = "IExecutionContext"

        def __init__(self, engine: ICudaEngine) -> None:
            self._engine = engine
            self._shapes: dict[str, tuple[int, ...]] = {}
            self._addr: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            world.set_input_shape_calls += 1
            lo, _, hi = self._engine._profile
            shape = tuple(shape)
            if name not in self._engine._inputs or len(shape) != len(lo):
                return False
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
                return False
            self._shapes[name] = shape
            return True

        def set_tensor_address(self, name: str, memory: int) -> bool:
            if name not in self._engine._io or int(memory) not in world.memory:
                return False
            self._addr[name] = int(memory)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            world.need_context("execute_async_v3")
            eng = self._engine
            if set(self._addr) != set(eng._io) or set(self._shapes) != set(eng._inputs):
                return False
            feeds = {}
            for name in eng._inputs:
                shape = self._shapes[name]
                dt = np.dtype(_DT_TO_NP[eng._io[name][1]])
                n = int(np.prod(shape)) * dt.itemsize
                feeds[name] = world.mem.view(self._addr[name], np.uint8, n).view(dt).reshape(shape)
            outs = eng._session.run(None, {k: v.astype(np.float32) for k, v in feeds.items()})
            for meta, value in zip(eng._session.get_outputs(), outs, strict=True):
                dt = np.dtype(_DT_TO_NP[eng._io[meta.name][1]])
                b = np.ascontiguousarray(value.astype(dt)).view(np.uint8).ravel()
                addr = self._addr[meta.name]
                if b.size > world.memory[addr][1]:  # the bound buffer is too small
                    return False
                world.mem.view(addr, np.uint8, b.size)[:] = b
            world.executions += 1
            return True

    class ICudaEngine:
        _real = "ICudaEngine"

        def __init__(self, plan: dict[str, Any]) -> None:
            import onnxruntime as ort

            self._session = ort.InferenceSession(
                base64.b64decode(plan["model"]), providers=["CPUExecutionProvider"]
            )
            self._names = [t[0] for t in plan["inputs"]] + [t[0] for t in plan["outputs"]]
            self._io = {t[0]: ("input", t[2]) for t in plan["inputs"]}
            self._io.update({t[0]: ("output", t[2]) for t in plan["outputs"]})
            self._inputs = [t[0] for t in plan["inputs"]]
            self._profile = tuple(tuple(x) for x in plan["profile"])

        num_io_tensors = property(lambda self: len(self._names))

        def get_tensor_name(self, index: int) -> str:
            return self._names[index]

        def get_tensor_mode(self, name: str) -> Any:
            return TensorIOMode.INPUT if self._io[name][0] == "input" else TensorIOMode.OUTPUT  # type: ignore[attr-defined]

        def get_tensor_dtype(self, name: str) -> Any:
            return DataType[self._io[name][1]]

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Any]:
            if name not in self._inputs or profile_index != 0:
                raise IndexError(name)
            return [list(s) for s in self._profile]

        def create_execution_context(self) -> IExecutionContext:
            world.need_context("create_execution_context")
            return IExecutionContext(self)

    class Runtime:
        _real = "Runtime"

        def __init__(self, logger: Any) -> None:
            self._logger = logger

        def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
            world.need_context("deserialize_cuda_engine")
            try:
                plan = json.loads(bytes(memoryview(serialized_engine)))
            except ValueError:
                _log(self._logger, "ERROR", "Serialization assertion failed: magic tag")
                return None
            if plan.get("fake_tensorrt") != version:
                _log(self._logger, "ERROR", f"plan from TensorRT {plan.get('fake_tensorrt')}")
                return None
            return ICudaEngine(plan)

    for name, obj in list(locals().items()):
        if isinstance(obj, type) or name == "nptype":
            setattr(trt, name, obj)
    return trt


def check_against_snapshot(trt: types.ModuleType, version: str) -> list[str]:
    """Members a fake offers that the real bindings of ``version`` lack (must be empty)."""
    snap = load_snapshot(version)
    real_top = set(snap["classes"]) | set(snap["functions"]) | set(snap["other"])
    bad = []
    for name in dir(trt):
        if name.startswith("__") and name != "__version__":
            continue
        if name not in real_top:
            bad.append(name)
            continue
        obj = getattr(trt, name)
        real = getattr(obj, "_real", None)
        if real is None:
            continue
        members = snap["classes"][real]
        for m in vars(obj):
            if m.startswith("_") and m != "__init__":
                continue
            if m not in members:
                bad.append(f"{real}.{m}")
    return bad


def install(monkeypatch: Any, version: str, world: World) -> types.ModuleType:
    """Put the fakes in sys.modules (tensorrt, pycuda, pycuda.driver) for one test."""
    import sys

    trt = make_fake_tensorrt(version, world)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    fake_pycuda.install(world, monkeypatch.setitem)
    return trt
