"""``spade-export``: backbone -> fp32 ONNX (parity-checked) -> fp16/INT8 -> TensorRT engine.

The precision and TensorRT steps live in other modules and are imported only when asked for, so
a CPU-only install can export fp32 ONNX without them and says clearly what is missing otherwise.
"""

from __future__ import annotations

import importlib
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from spade_edge.cli._common import make_main
from spade_edge.export.backbones import BACKBONES, get_backbone
from spade_edge.export.onnx_export import export_onnx
from spade_edge.runtime.errors import BackendUnavailableError, InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Export an ImageNet backbone to a spade-edge ONNX model (and optionally an engine).",
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


def _lazy(target: str, what: str) -> Any:
    """Import ``module:function`` for an optional step; a clean error if it cannot load."""
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise BackendUnavailableError(
            f"{what} needs {module}.{attr}, which cannot be imported here ({e})"
        ) from None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _default_output(backbone: str | None, from_onnx: Path | None, precision: str) -> Path:
    if from_onnx is not None:
        stem = from_onnx.name.removesuffix(".onnx").removesuffix(".fp32")
        return from_onnx.with_name(f"{stem}.{precision}.onnx")
    assert backbone is not None
    return Path(f"{backbone}.onnx" if precision == "fp32" else f"{backbone}.{precision}.onnx")


def _parent_path(out: Path, prec: str) -> Path:
    """Where the fp32 parent of an fp16/int8 output goes: beside it, ``<stem>.fp32.onnx``
    (a trailing ``.fp16``/``.int8`` in the stem is replaced, not stacked)."""
    stem = out.name.removesuffix(".onnx").removesuffix(f".{prec}")
    return out.with_name(f"{stem}.fp32.onnx")


def _print_report(report: Any) -> None:
    c = report.contract
    t = Table(title=f"exported {c.backbone}", show_header=False, title_justify="left")
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")  # long paths are shown in full
    t.add_row("output", str(report.path))
    t.add_row("weights", c.weights)
    t.add_row("image size", f"{c.image_size} (resize {c.resize}, centre crop)")
    levels = ", ".join(f"{lv.name} {lv.height}x{lv.width}x{lv.channels}" for lv in c.levels)
    t.add_row("levels (NHWC)", f"{levels}; pooled {c.pooled_dim}")
    t.add_row("export time", f"{report.seconds:.1f} s")
    t.add_row("size", _mb(report.bytes))
    t.add_row("opset", str(report.opset))
    console.print(t)
    # on its own unwrapped line so it can be copied or grepped whole
    console.print(f"[bold]fingerprint[/] {report.fingerprint}", soft_wrap=True)
    if report.parity:
        p = Table(title="parity vs torch (ORT CPU, batch 2)", title_justify="left")
        p.add_column("output")
        p.add_column("max abs", justify="right")
        p.add_column("max rel", justify="right")
        for name, (a, r) in report.parity.items():
            p.add_row(name, f"{a:.2e}", f"{r:.2e}")
        console.print(p)


def _list_backbones() -> None:
    t = Table(title="backbones")
    for col in ("name", "aliases", "levels (stride)", "pooled", "imagenet weights"):
        t.add_column(col)
    for s in BACKBONES.values():
        lv = ", ".join(f"{n} ({st})" for n, st in zip(s.level_names, s.strides, strict=True))
        src = s.weights.url or f"pip package {s.weights.pip_name}"
        t.add_row(s.name, ", ".join(s.aliases), lv, str(s.pooled_dim), src)
    console.print(t)


@app.command()
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
    prec = precision.value
    # validate everything cheap before minutes of export work
    if from_onnx is None and backbone is None:
        raise InputError("--backbone is required (or --from-onnx FP32.onnx); see --list")
    if backbone is not None:
        backbone = get_backbone(backbone).name
    if from_onnx is not None and not from_onnx.is_file():
        raise InputError(f"{from_onnx}: --from-onnx file not found")
    if prec == "int8":
        if calib_dir is None:
            raise InputError("--precision int8 needs --calib-dir FOLDER of normal images")
        if not calib_dir.is_dir():
            raise InputError(f"{calib_dir}: --calib-dir is not a folder")
    target = (int8_target.value if int8_target else "trt") if engine is None else "trt"
    if engine is not None and int8_target is not None and int8_target.value == "cpu":
        raise InputError("--int8-target cpu models cannot be built by TensorRT; drop --engine")
    if calib_images is not None and calib_images < 1:
        raise InputError(f"--calib-images must be >= 1, got {calib_images}")
    if max_batch < 1:
        raise InputError(f"--max-batch must be >= 1, got {max_batch}")
    if workspace is not None and workspace < 1:
        raise InputError(f"--workspace must be >= 1 MB, got {workspace}")
    convert = None
    if prec == "fp16":
        convert = _lazy("spade_edge.calibration.fp16:convert_fp16", "--precision fp16")
    elif prec == "int8":
        convert = _lazy("spade_edge.calibration.int8:quantize_int8", "--precision int8")
    build_engine = _lazy("spade_edge.export.trt_build:build_engine", "--engine") if engine else None
    out = output if output is not None else _default_output(backbone, from_onnx, prec)

    # 1. fp32 parent
    if from_onnx is not None:
        if prec == "fp32" and (output is not None or engine is None):
            raise InputError(
                "--from-onnx with --precision fp32 only builds an engine: pass --engine PATH "
                "(or --precision fp16/int8)"
            )
        fp32_path = from_onnx
    else:
        assert backbone is not None
        fp32_path = out if prec == "fp32" else _parent_path(out, prec)
        with console.status(f"exporting {backbone} to {fp32_path} ..."):
            report = export_onnx(
                backbone,
                fp32_path,
                weights=weights,
                image_size=image_size,
                check=check,
                opset=opset,
                seed=seed,
            )
        _print_report(report)

    # 2. fp16 / int8 from the fp32 parent
    final = fp32_path
    if convert is not None:
        t0 = time.perf_counter()
        with console.status(f"converting {fp32_path} to {prec} ..."):
            if prec == "fp16":
                # with normal images the accuracy check runs and may allow fp32-gallery reuse
                convert(fp32_path, out, check_dir=calib_dir)
            else:
                assert calib_dir is not None
                convert(fp32_path, out, calib_dir, calib_method.value, calib_images, target=target)
        final = out
        console.print(
            f"{prec} model: {out} ({_mb(out.stat().st_size)}, {time.perf_counter() - t0:.1f} s)"
        )

    # 3. TensorRT engine from the final ONNX
    if build_engine is not None:
        assert engine is not None
        plan = None
        if raw:
            plan = engine.with_suffix(".raw.plan" if engine.suffix == ".plan" else ".plan")
        t0 = time.perf_counter()
        build_engine(final, engine, max_batch, workspace, timing_cache, plan)
        extra = f", raw plan {plan}" if plan else ""
        console.print(
            f"engine: {engine} ({_mb(engine.stat().st_size)}, "
            f"{time.perf_counter() - t0:.1f} s{extra})"
        )


main = make_main(app)

if __name__ == "__main__":
    main()
