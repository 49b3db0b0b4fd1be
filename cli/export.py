"""``spade-export``: backbone -> fp32 ONNX (parity-checked) -> fp16/INT8 -> TensorRT engine.

The pipeline and its output naming are ``spade_edge.export.pipeline``; this command parses the
options, checks the outputs can be written, and prints each finished step. Heavy dependencies
(torch, onnx, TensorRT) load inside the step that needs them, so a missing one is named clearly.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from spade_edge.cli import _common as common
from spade_edge.export.backbones import BACKBONES
from spade_edge.export.onnx_export import ExportReport
from spade_edge.export.pipeline import Step, outputs, plan_export, run_export

app = common.new_app(
    "Export an ImageNet backbone to a spade-edge ONNX model (and optionally an engine).",
    no_args_is_help=True,
)
console = Console(highlight=False)


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class Int8Target(str, Enum):
    trt = "trt"
    cpu = "cpu"


class CalibMethod(str, Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _print_report(report: ExportReport) -> None:
    c = report.contract
    t = Table(title=common.text(f"exported {c.backbone}"), show_header=False, title_justify="left")
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")  # long paths are shown in full
    t.add_row("output", common.text(report.path))
    t.add_row("weights", common.text(c.weights))
    t.add_row("image size", f"{c.image_size} (resize {c.resize}, centre crop)")
    levels = ", ".join(f"{lv.name} {lv.height}x{lv.width}x{lv.channels}" for lv in c.levels)
    t.add_row("levels (NHWC)", f"{levels}; pooled {c.pooled_dim}")
    t.add_row("export time", f"{report.seconds:.1f} s")
    t.add_row("size", _mb(report.bytes))
    t.add_row("opset", str(report.opset))
    console.print(t)
    # on its own unwrapped line so it can be copied or grepped whole
    console.print(Text.assemble(("fingerprint ", "bold"), report.fingerprint), soft_wrap=True)
    if report.parity:
        p = Table(title="parity vs torch (ORT CPU, batch 2)", title_justify="left")
        p.add_column("output")
        p.add_column("max abs", justify="right")
        p.add_column("max rel", justify="right")
        for name, (a, r) in report.parity.items():
            p.add_row(common.text(name), f"{a:.2e}", f"{r:.2e}")
        console.print(p)


def _print_step(step: Step) -> None:
    if step.report is not None:
        _print_report(step.report)
    elif step.kind == "engine":
        extra = f", raw plan {step.raw_plan}" if step.raw_plan else ""
        size = _mb(step.path.stat().st_size)
        console.print(common.text(f"engine: {step.path} ({size}, {step.seconds:.1f} s{extra})"))
    else:
        size = _mb(step.path.stat().st_size)
        console.print(common.text(f"{step.kind} model: {step.path} ({size}, {step.seconds:.1f} s)"))


def _list_backbones() -> None:
    t = Table(title="backbones")
    for col in ("name", "aliases", "levels (stride)", "pooled", "imagenet weights"):
        t.add_column(col)
    for s in BACKBONES.values():
        lv = ", ".join(f"{n} ({st})" for n, st in zip(s.level_names, s.strides, strict=True))
        src = s.weights.url or f"pip package {s.weights.pip_name}"
        t.add_row(s.name, ", ".join(s.aliases), lv, str(s.pooled_dim), common.text(src))
    console.print(t)


@common.command(app)
def export(
    backbone: Annotated[
        str | None, typer.Option("--backbone", "-b", help="Backbone name (see --list).")
    ] = None,
    weights: Annotated[
        str,
        typer.Option("--weights", "-w", help="imagenet (download/verify), random, or a .pth path."),
    ] = "imagenet",
    image_size: Annotated[
        int, typer.Option("--image-size", help="Crop side S (multiple of 16).")
    ] = 224,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="ONNX to write (default: BACKBONE.onnx, or BACKBONE.PREC.onnx)."
        ),
    ] = None,
    precision: Annotated[
        Precision, typer.Option("--precision", help="fp32, or fp16/int8 derived from fp32.")
    ] = Precision.fp32,
    from_onnx: Annotated[
        Path | None,
        typer.Option("--from-onnx", help="Existing fp32 spade-edge ONNX to convert/build from."),
    ] = None,
    calib_dir: Annotated[
        Path | None,
        typer.Option("--calib-dir", help="Normal images: INT8 calibration / fp16 accuracy check."),
    ] = None,
    calib_method: Annotated[
        CalibMethod, typer.Option("--calib-method", help="INT8 range estimator.")
    ] = CalibMethod.minmax,
    calib_images: Annotated[
        int | None, typer.Option("--calib-images", help="Use at most N calibration images.")
    ] = None,
    int8_target: Annotated[
        Int8Target | None,
        typer.Option(
            "--int8-target",
            help="trt: Q/DQ TensorRT can build (symmetric, float bias; runs in ORT too); "
            "cpu: fastest on ONNX Runtime CPU, not buildable by TensorRT. --engine forces trt.",
        ),
    ] = None,
    engine: Annotated[
        Path | None, typer.Option("--engine", help="Also build a TensorRT engine file here.")
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Engine max batch.")] = 8,
    workspace: Annotated[
        int | None, typer.Option("--workspace", help="TensorRT workspace limit in MB.")
    ] = None,
    timing_cache: Annotated[
        Path | None, typer.Option("--timing-cache", help="TensorRT timing cache file (reused).")
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Also write the bare TensorRT plan (ENGINE.plan).")
    ] = False,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="ONNX Runtime vs torch parity check.")
    ] = True,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 18).")] = 18,
    seed: Annotated[int, typer.Option("--seed", help="Seed for --weights random.")] = 0,
    list_backbones: Annotated[
        bool, typer.Option("--list", help="List the available backbones and exit.")
    ] = False,
) -> None:
    """Export BACKBONE to ONNX: NHWC pyramid levels + pooled, contract and fingerprint inside."""
    if list_backbones:
        _list_backbones()
        return
    plan = plan_export(
        backbone,
        output=output,
        precision=precision.value,
        from_onnx=from_onnx,
        calib_dir=calib_dir,
        calib_method=calib_method.value,
        calib_images=calib_images,
        int8_target=int8_target.value if int8_target else None,
        engine=engine,
        raw=raw,
        max_batch=max_batch,
        workspace=workspace,
        timing_cache=timing_cache,
        weights=weights,
        image_size=image_size,
        check=check,
        opset=opset,
        seed=seed,
    )
    for role, path in outputs(plan).items():
        common.check_output_file(path, role, make_parents=True)  # the export creates folders
    run_export(plan, on_step=_print_step, status=lambda msg: console.status(common.text(msg)))


main = common.make_main(app)

if __name__ == "__main__":
    main()
