"""INT8 Q/DQ models calibrated on normal images only (ONNX Runtime static quantization).

Why Q/DQ: the same file runs in ONNX Runtime CPU and is what a TensorRT INT8 engine is built
from (TensorRT 10/11 build strongly typed networks; precision lives in the ONNX graph as
QuantizeLinear/DequantizeLinear pairs). Why normal images only: SPADE never sees defects before
deployment, and activation ranges must cover what the line produces, not ImageNet.

Two quantization *targets* exist because the two runtimes want different Q/DQ graphs (measured,
docs/precision.md):

* ``"trt"`` (default): int8 activations quantized **symmetrically** (zero point 0) and float
  biases -- TensorRT's explicit-quantization rules (it refuses non-zero zero points and int32
  DequantizeLinear inputs). Runs in ORT CPU too, but ORT's x86 kernels fuse only part of it.
* ``"cpu"``: uint8 asymmetric activations, int8 weights, int32 biases -- the layout ORT's x86
  kernels (VNNI) fuse into QLinearConv end to end; TensorRT cannot build it.

Weights are int8, symmetric, per output channel in both. Which nodes stay float is a policy
(``keep_float``), chosen by measurement (docs/precision.md, "Which nodes stay float").
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.calibration.derive import ImageSet, derive_model, read_normal_images
from spade_edge.calibration.lineage import (
    CHECK_QUERIES,
    CHECK_REFERENCE,
    MIN_CHECK_QUERIES,
    accuracy_check,
)
from spade_edge.runtime.errors import CalibrationError, ConfigError
from spade_edge.runtime.model_meta import ModelInfo

log = logging.getLogger(__name__)

#: Fewer readable normal images than this and calibration is refused: activation ranges from a
#: handful of images miss the variation of the line (measured: docs/precision.md).
MIN_CALIB_IMAGES = 10
#: Images used for calibration when ``num_images`` is None (plus up to CHECK_QUERIES held out).
DEFAULT_CALIB_IMAGES = 64
#: Images per calibration batch (bounds the memory of the calibrator's intermediate outputs).
CALIB_BATCH = 4
METHODS = ("minmax", "entropy", "percentile")
TARGETS = ("trt", "cpu")
#: keep_float policies: "none" quantizes every supported node; "outputs" keeps the nodes that
#: produce the model outputs (channels-last Transposes, pooling) and the op computing each
#: output feature in float; "head" also keeps the pooled-only head (nodes that feed ``pooled``
#: but no pyramid level).
KEEP_FLOAT = ("none", "outputs", "head")
DEFAULT_KEEP_FLOAT = "outputs"
#: Ops that only move or pool data between the last computed feature and a model output.
_LAYOUT_OPS = frozenset(
    {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "ReduceMean",
     "GlobalAveragePool", "GlobalMaxPool"}
)  # fmt: skip


@dataclass
class Int8Report:
    """What ``quantize_int8`` wrote and how close it is to the fp32 parent."""

    path: Path
    fingerprint: str
    parent_fingerprint: str
    method: str
    target: str
    keep_float: str
    calib_images: int
    holdout_images: int
    skipped: list[tuple[str, str]]
    excluded_nodes: list[str]
    quantized_nodes: int
    check: dict[str, Any]
    passed: bool
    gallery_compatible: bool
    seconds: float
    bytes: int


class _Reader:
    """CalibrationDataReader over preprocessed images, in batches; supports strided collection."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int = CALIB_BATCH) -> None:
        self.batches = [x[i : i + batch] for i in range(0, len(x), batch)]
        self.input_name = input_name
        self.start, self.end = 0, len(self.batches)
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start + self.pos >= self.end:
            return None
        b = self.batches[self.start + self.pos]
        self.pos += 1
        return {self.input_name: b}

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.pos = start_index, min(end_index, len(self.batches)), 0

    def rewind(self) -> None:
        self.start, self.end, self.pos = 0, len(self.batches), 0


def _name_nodes(model: Any) -> None:
    """Give every node a unique name (nodes_to_exclude works on names)."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)


def float_nodes(model: Any, policy: str, level_names: Sequence[str], pooled_name: str) -> list[str]:
    """Names of the nodes ``policy`` keeps in float (see KEEP_FLOAT).

    Unnamed nodes are named in place first (``nodes_to_exclude`` works on names).
    """
    if policy not in KEEP_FLOAT:
        raise ConfigError(f"keep_float must be one of {', '.join(KEEP_FLOAT)}, got {policy!r}")
    _name_nodes(model)
    if policy == "none":
        return []
    producer = {o: n for n in model.graph.node for o in n.output}
    keep: list[str] = []
    for out in [*level_names, pooled_name]:
        node = producer.get(out)
        while node is not None:
            if node.name not in keep:
                keep.append(node.name)
            if node.op_type not in _LAYOUT_OPS or not node.input:
                break  # the op computing the feature itself: kept, and stop
            node = producer.get(node.input[0])
    if policy == "head":

        def ancestors(names: Sequence[str]) -> set[str]:
            seen: set[str] = set()
            stack = [producer[t] for t in names if t in producer]
            while stack:
                n = stack.pop()
                if n.name in seen:
                    continue
                seen.add(n.name)
                stack.extend(producer[t] for t in n.input if t in producer)
            return seen

        head = ancestors([pooled_name]) - ancestors(level_names)
        keep += sorted(h for h in head if h not in keep)
    return keep


def bypass_qdq(model: Any, node_names: Sequence[str]) -> int:
    """Let float-kept nodes read the float tensor, not its QuantizeLinear->DequantizeLinear copy.

    ``nodes_to_exclude`` only keeps a node's own computation in float: when its input tensor
    also feeds a quantized node, quantize_static makes the excluded node read the shared Q/DQ
    pair, so its output still carries int8 rounding. Rewiring to the Q input removes that;
    Q/DQ nodes left without consumers are dropped. Returns the number of inputs rewired.
    """
    graph = model.graph
    keep = set(node_names)
    producer = {o: n for n in graph.node for o in n.output}
    rewired = 0
    for node in graph.node:
        if node.name not in keep:
            continue
        for i, t in enumerate(node.input):
            dq = producer.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            node.input[i] = q.input[0]
            rewired += 1
    outputs = {o.name for o in graph.output}
    while True:  # drop Q/DQ chains nobody reads any more
        used = {t for n in graph.node for t in n.input} | outputs
        dead = [
            n
            for n in graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")
            and not any(o in used for o in n.output)
        ]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {t for n in graph.node for t in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return rewired


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    calib_dir: str | Path,
    method: str = "minmax",
    num_images: int | None = None,
    *,
    target: str = "trt",
    keep_float: str = DEFAULT_KEEP_FLOAT,
    percentile: float = 99.999,
    preprocess: bool = True,
    seed: int = 0,
) -> Int8Report:
    """Quantize the fp32 spade-edge model ``src`` to a Q/DQ INT8 model at ``dst`` (atomic).

    ``calib_dir``: a folder of normal images (searched recursively), read through the model's
    preprocessing contract. ``num_images`` (default 64, minimum 10) are used for calibration
    and up to 8 further images are held out for the accuracy check recorded in the lineage.
    ``method``: minmax | entropy | percentile. ``target``: trt | cpu (module docstring).
    """
    t0 = time.perf_counter()
    method = method.lower()
    n_calib = _check_options(method, target, keep_float, num_images, percentile)
    step = _Int8Step(
        Path(calib_dir), n_calib, method, target, keep_float, percentile, preprocess, seed
    )
    derived = derive_model(src, dst, step)
    lineage = derived.lineage
    return Int8Report(
        path=derived.path,
        fingerprint=lineage.fingerprint,
        parent_fingerprint=lineage.parent_fingerprint,
        method=method,
        target=target,
        keep_float=keep_float,
        calib_images=len(step.calib),
        holdout_images=len(step.hold),
        skipped=step.skipped,
        excluded_nodes=step.excluded,
        quantized_nodes=step.quantized,
        check=lineage.check,
        passed=lineage.passed,
        gallery_compatible=lineage.gallery_compatible,
        seconds=time.perf_counter() - t0,
        bytes=derived.path.stat().st_size,
    )


@dataclass
class _Int8Step:
    """The INT8 step of ``derive_model``: calibrate on normal images, check on held-out ones."""

    calib_dir: Path
    n_calib: int
    method: str
    target: str
    keep_float: str
    percentile: float
    preprocess: bool
    seed: int
    # set by build
    calib: np.ndarray = field(default_factory=lambda: np.zeros(0))
    hold: np.ndarray = field(default_factory=lambda: np.zeros(0))
    skipped: list[tuple[str, str]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    quantized: int = 0
    precision = "int8"
    verb = "quantize"

    def build(self, parent: ModelInfo) -> tuple[Any, dict[str, Any]]:
        if not self.calib_dir.is_dir():
            raise CalibrationError(
                f"{self.calib_dir}: calibration folder not found (need normal images)"
            )
        want = self.n_calib + CHECK_QUERIES
        images = read_normal_images(self.calib_dir, parent.contract, want, self.seed)
        self.calib, self.hold = _split_calibration(images, self.calib_dir)
        self.skipped = images.skipped
        model, self.excluded, self.quantized = self._quantize(parent)
        quant_info = {
            "method": self.method,
            "target": self.target,
            "keep_float": self.keep_float,
            "calib_images": len(self.calib),
            "activations": "int8 symmetric" if self.target == "trt" else "uint8 asymmetric",
            "weights": "int8 symmetric per-channel",
            "bias": "float" if self.target == "trt" else "int32",
            "float_nodes": len(self.excluded),
        }
        return model, {"quantization": quant_info}

    def check(self, parent: ModelInfo, candidate: Path, dst: Path) -> dict[str, Any]:
        reference = self.calib[:CHECK_REFERENCE]
        return accuracy_check(parent.path, candidate, self.hold, reference, "int8")

    def tool(self) -> dict[str, Any]:
        tool: dict[str, Any] = {
            "tool": "spade_edge.calibration.int8",
            "method": self.method,
            "target": self.target,
            "keep_float": self.keep_float,
            "calib_images": len(self.calib),
            "holdout_images": len(self.hold),
            "skipped_images": len(self.skipped),
            "seed": self.seed,
        }
        if self.method == "percentile":
            tool["percentile"] = self.percentile
        return tool

    def _quantize(self, parent: ModelInfo) -> tuple[Any, list[str], int]:
        """quant_pre_process + quantize_static in a temp folder; returns (model, excluded, #Q)."""
        import onnx
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        src = parent.path
        cm = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[self.method]
        with tempfile.TemporaryDirectory(prefix="spade-int8-") as tmp:
            pre = Path(tmp) / "pre.onnx"
            if self.preprocess:
                try:
                    quant_pre_process(str(src), str(pre))
                except Exception as e:  # ORT raises plain exceptions; fall back to the raw model
                    log.warning("%s: quant_pre_process failed (%s); quantizing as exported", src, e)
                    pre.write_bytes(src.read_bytes())
            else:
                pre.write_bytes(src.read_bytes())
            m = onnx.load(str(pre))
            lv = [lv.name for lv in parent.contract.levels]
            excluded = float_nodes(m, self.keep_float, lv, parent.contract.pooled_name)
            onnx.save(m, str(pre))
            del m
            extra: dict[str, Any] = {
                "WeightSymmetric": True,
                "CalibStridedMinMax": 1,  # collect per batch: bounded memory for every method
            }
            if self.target == "trt":
                extra.update(ActivationSymmetric=True, QuantizeBias=False)
                act = QuantType.QInt8
            else:
                act = QuantType.QUInt8
            if self.method == "percentile":
                extra["CalibPercentile"] = self.percentile
            out = Path(tmp) / "int8.onnx"
            reader = _Reader(self.calib, parent.contract.input_name)
            ort_log = logging.getLogger("root")
            level = ort_log.level
            try:
                ort_log.setLevel(logging.ERROR)  # quantize_static warns through the root logger
                with contextlib.redirect_stdout(io.StringIO()):  # histogram calibrators print
                    quantize_static(
                        str(pre),
                        str(out),
                        reader,
                        quant_format=QuantFormat.QDQ,
                        per_channel=True,
                        reduce_range=False,
                        activation_type=act,
                        weight_type=QuantType.QInt8,
                        nodes_to_exclude=excluded,
                        calibrate_method=cm,
                        extra_options=extra,
                    )
            except (ValueError, RuntimeError) as e:
                raise CalibrationError(f"{src}: INT8 quantization failed: {e}") from None
            finally:
                ort_log.setLevel(level)
            model = onnx.load(str(out))
        bypass_qdq(model, excluded)
        n_q = sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")
        if n_q == 0:
            raise CalibrationError(f"{src}: INT8 quantization inserted no QuantizeLinear node")
        return model, excluded, n_q


def _check_options(
    method: str, target: str, keep_float: str, num_images: int | None, percentile: float
) -> int:
    """ConfigError for a bad option; returns the calibration image count to use."""
    if method not in METHODS:
        raise ConfigError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    if target not in TARGETS:
        raise ConfigError(f"INT8 target must be one of {', '.join(TARGETS)}, got {target!r}")
    if keep_float not in KEEP_FLOAT:
        raise ConfigError(f"keep_float must be one of {', '.join(KEEP_FLOAT)}, got {keep_float!r}")
    n_calib = DEFAULT_CALIB_IMAGES if num_images is None else num_images
    if isinstance(n_calib, bool) or not isinstance(n_calib, int) or n_calib < MIN_CALIB_IMAGES:
        raise ConfigError(
            f"calibration image count must be an integer >= {MIN_CALIB_IMAGES}, got {num_images!r}"
        )
    if not 50.0 < percentile <= 100.0:
        raise ConfigError(f"percentile must be in (50, 100], got {percentile}")
    return n_calib


def _split_calibration(images: ImageSet, calib_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(calibration tensors, held-out tensors for the accuracy check); refuses too few images."""
    usable = len(images.paths)
    if usable < MIN_CALIB_IMAGES:
        bad = f", {len(images.skipped)} unreadable" if images.skipped else ""
        raise CalibrationError(
            f"{calib_dir}: only {usable} readable normal image(s) ({images.available} found{bad}); "
            f"INT8 calibration needs at least {MIN_CALIB_IMAGES} (recommended "
            f"{DEFAULT_CALIB_IMAGES} + {CHECK_QUERIES} held out for the accuracy check)"
        )
    spare = usable - MIN_CALIB_IMAGES
    n_hold = min(CHECK_QUERIES, spare) if spare >= MIN_CHECK_QUERIES else 0
    calib = images.tensors[: usable - n_hold]
    hold = images.tensors[usable - n_hold :]
    if n_hold == 0:
        warnings.warn(
            f"{calib_dir}: no normal images left for the accuracy check (need "
            f"{MIN_CALIB_IMAGES + MIN_CHECK_QUERIES}+); the INT8 model will not be allowed to "
            "reuse galleries of its fp32 parent",
            UserWarning,
            5,  # the caller of quantize_int8 (via derive_model and the step's build)
        )
    return calib, hold


__all__ = [
    "DEFAULT_CALIB_IMAGES",
    "KEEP_FLOAT",
    "METHODS",
    "MIN_CALIB_IMAGES",
    "TARGETS",
    "Int8Report",
    "float_nodes",
    "quantize_int8",
]
