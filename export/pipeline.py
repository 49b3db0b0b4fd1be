"""The export pipeline: backbone -> fp32 ONNX (parity-checked) -> fp16/INT8 -> TensorRT engine.

``plan_export`` validates every option and names every output before any work (minutes of
export must not end in "--calib-dir is not a folder"); ``run_export`` then runs the steps and
reports each one through a callback, so ``spade export`` only prints. Output naming:

* fp32: ``BACKBONE.onnx`` (or ``-o``);
* fp16/int8: ``BACKBONE.PREC.onnx`` (or ``-o``), its fp32 parent beside it as
  ``STEM.fp32.onnx`` (a trailing ``.fp16``/``.int8`` in the stem is replaced, not stacked);
* from an existing fp32 model ``M.onnx`` / ``M.fp32.onnx``: ``M.PREC.onnx``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spade_edge.calibration.fp16 import convert_fp16
from spade_edge.calibration.int8 import METHODS, TARGETS, quantize_int8
from spade_edge.export.backbones import get_backbone
from spade_edge.export.onnx_export import ExportReport, export_onnx
from spade_edge.export.trt_build import build_engine
from spade_edge.runtime.compat import DERIVED_PRECISIONS
from spade_edge.runtime.errors import InputError
from spade_edge.runtime.runners.trt import import_tensorrt

PRECISIONS = ("fp32", *DERIVED_PRECISIONS)
INT8_TARGETS = TARGETS
CALIB_METHODS = METHODS


@dataclass(frozen=True)
class ExportPlan:
    """Every decision of one export, made and checked before any work."""

    backbone: str | None  # canonical name; None when converting --from-onnx
    from_onnx: Path | None
    precision: str
    fp32_path: Path  # exported here, or the given --from-onnx model
    output: Path | None  # the fp16/int8 model (None for fp32)
    engine: Path | None
    raw_plan: Path | None
    weights: str = "imagenet"
    image_size: int = 224
    check: bool = True
    opset: int = 18
    seed: int = 0
    calib_dir: Path | None = None
    calib_method: str = "minmax"
    calib_images: int | None = None
    int8_target: str = "trt"
    max_batch: int = 8
    workspace: int | None = None
    timing_cache: Path | None = None

    @property
    def final(self) -> Path:
        """The ONNX model the engine is built from (and that the user deploys)."""
        return self.output if self.output is not None else self.fp32_path


@dataclass(frozen=True)
class Step:
    """One finished step: ``kind`` is ``onnx`` (report set), ``fp16``/``int8`` or ``engine``."""

    kind: str
    path: Path
    seconds: float
    report: ExportReport | None = None
    raw_plan: Path | None = None


def default_output(backbone: str | None, from_onnx: Path | None, precision: str) -> Path:
    """Where the (final) ONNX model goes when ``-o`` is not given."""
    if from_onnx is not None:
        stem = from_onnx.name.removesuffix(".onnx").removesuffix(".fp32")
        return from_onnx.with_name(f"{stem}.{precision}.onnx")
    if backbone is None:
        raise InputError("--backbone is required (or --from-onnx FP32.onnx); see --list")
    return Path(f"{backbone}.onnx" if precision == "fp32" else f"{backbone}.{precision}.onnx")


def parent_path(out: Path, precision: str) -> Path:
    """Where the fp32 parent of an fp16/int8 output goes: beside it, ``<stem>.fp32.onnx``."""
    stem = out.name.removesuffix(".onnx").removesuffix(f".{precision}")
    return out.with_name(f"{stem}.fp32.onnx")


def plan_export(
    backbone: str | None = None,
    *,
    output: Path | None = None,
    precision: str = "fp32",
    from_onnx: Path | None = None,
    calib_dir: Path | None = None,
    calib_method: str = "minmax",
    calib_images: int | None = None,
    int8_target: str | None = None,
    engine: Path | None = None,
    raw: bool = False,
    max_batch: int = 8,
    workspace: int | None = None,
    timing_cache: Path | None = None,
    weights: str = "imagenet",
    image_size: int = 224,
    check: bool = True,
    opset: int = 18,
    seed: int = 0,
) -> ExportPlan:
    """Check the options (InputError/ConfigError naming the option) and name every output."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if calib_method not in CALIB_METHODS:
        raise InputError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}")
    if int8_target is not None and int8_target not in INT8_TARGETS:
        raise InputError(f"--int8-target must be one of {', '.join(INT8_TARGETS)}")
    if from_onnx is None and backbone is None:
        raise InputError("--backbone is required (or --from-onnx FP32.onnx); see --list")
    if backbone is not None:
        backbone = get_backbone(backbone).name
    if from_onnx is not None and not from_onnx.is_file():
        raise InputError(f"{from_onnx}: --from-onnx file not found")
    if precision == "int8":
        if calib_dir is None:
            raise InputError("--precision int8 needs --calib-dir FOLDER of normal images")
        if not calib_dir.is_dir():
            raise InputError(f"{calib_dir}: --calib-dir is not a folder")
    if engine is not None and int8_target == "cpu":
        raise InputError("--int8-target cpu models cannot be built by TensorRT; drop --engine")
    if calib_images is not None and calib_images < 1:
        raise InputError(f"--calib-images must be >= 1, got {calib_images}")
    if max_batch < 1:
        raise InputError(f"--max-batch must be >= 1, got {max_batch}")
    if workspace is not None and workspace < 1:
        raise InputError(f"--workspace must be >= 1 MB, got {workspace}")
    if from_onnx is not None and precision == "fp32" and (output is not None or engine is None):
        raise InputError(
            "--from-onnx with --precision fp32 only builds an engine: pass --engine PATH "
            "(or --precision fp16/int8)"
        )
    if engine is not None:
        import_tensorrt()  # fail now, not after minutes of export, when TensorRT is missing
    out = output if output is not None else default_output(backbone, from_onnx, precision)
    if from_onnx is not None:
        fp32_path = from_onnx
    else:
        fp32_path = out if precision == "fp32" else parent_path(out, precision)
    raw_plan = None
    if engine is not None and raw:
        raw_plan = engine.with_suffix(".raw.plan" if engine.suffix == ".plan" else ".plan")
    return ExportPlan(
        backbone=backbone,
        from_onnx=from_onnx,
        precision=precision,
        fp32_path=fp32_path,
        output=None if precision == "fp32" else out,
        engine=engine,
        raw_plan=raw_plan,
        weights=weights,
        image_size=image_size,
        check=check,
        opset=opset,
        seed=seed,
        calib_dir=calib_dir,
        calib_method=calib_method,
        calib_images=calib_images,
        # --engine forces a TensorRT-buildable INT8 model
        int8_target="trt" if engine is not None else (int8_target or "trt"),
        max_batch=max_batch,
        workspace=workspace,
        timing_cache=timing_cache,
    )


def outputs(plan: ExportPlan) -> dict[str, Path]:
    """Every file ``run_export`` writes, by role (for an up-front writability check)."""
    roles = [
        ("fp32 model", None if plan.from_onnx is not None else plan.fp32_path),
        (f"{plan.precision} model", plan.output),
        ("engine", plan.engine),
        ("raw plan", plan.raw_plan),
    ]
    return {role: path for role, path in roles if path is not None}


def run_export(
    plan: ExportPlan,
    on_step: Callable[[Step], None] | None = None,
    status: Callable[[str], AbstractContextManager[Any]] | None = None,
) -> list[Step]:
    """Run the planned steps in order; ``on_step`` sees each as it finishes, ``status(text)``
    wraps each long step (a spinner in the CLI)."""
    busy = status or (lambda _text: nullcontext())
    steps: list[Step] = []

    def done(step: Step) -> None:
        steps.append(step)
        if on_step is not None:
            on_step(step)

    if plan.from_onnx is None:
        assert plan.backbone is not None
        with busy(f"exporting {plan.backbone} to {plan.fp32_path} ..."):
            report = export_onnx(
                plan.backbone,
                plan.fp32_path,
                weights=plan.weights,
                image_size=plan.image_size,
                check=plan.check,
                opset=plan.opset,
                seed=plan.seed,
            )
        done(Step("onnx", report.path, report.seconds, report=report))
    if plan.output is not None:
        t0 = time.perf_counter()
        with busy(f"converting {plan.fp32_path} to {plan.precision} ..."):
            if plan.precision == "fp16":
                # with normal images the accuracy check runs and may allow fp32-gallery reuse
                convert_fp16(plan.fp32_path, plan.output, check_dir=plan.calib_dir)
            else:
                assert plan.calib_dir is not None
                quantize_int8(
                    plan.fp32_path,
                    plan.output,
                    plan.calib_dir,
                    plan.calib_method,
                    plan.calib_images,
                    target=plan.int8_target,
                )
        done(Step(plan.precision, plan.output, time.perf_counter() - t0))
    if plan.engine is not None:
        t0 = time.perf_counter()
        with busy(f"building a TensorRT engine from {plan.final} ..."):
            build_engine(
                plan.final,
                plan.engine,
                plan.max_batch,
                plan.workspace,
                plan.timing_cache,
                plan.raw_plan,
            )
        done(Step("engine", plan.engine, time.perf_counter() - t0, raw_plan=plan.raw_plan))
    return steps
