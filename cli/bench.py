"""`spade-bench`: per-stage latency against the hardware floor (CPU), or device times (CUDA)."""

from __future__ import annotations

import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from spade_edge.cli import _common as common
from spade_edge.export.demo import make_part
from spade_edge.export.onnx_export import export_onnx
from spade_edge.export.torch_reference import COMPARE_CONFIGS, compare_torch
from spade_edge.runtime.autoselect import select
from spade_edge.runtime.bench import bench_cpu, matrix_peaks
from spade_edge.runtime.errors import BackendUnavailableError, InputError
from spade_edge.runtime.matchers import cuda_bench

app = common.new_app()


class CudaShapes(str, Enum):
    """Backbone shapes the CUDA benchmark fakes (keys of cuda_bench.BACKBONES)."""

    wrn50 = "wrn50"
    efficientnet_lite0 = "efficientnet_lite0"
    lite0 = "lite0"


def _export(backbone: str, folder: Path) -> Path:
    out = folder / f"{backbone}.onnx"
    weights = "imagenet" if backbone.startswith("efficientnet") else "random"
    try:
        export_onnx(backbone, out, weights=weights)
    except ImportError:  # torch is an extra; the lean install times given models only
        raise BackendUnavailableError(
            "spade-bench exports its models with torch: pip install 'spade-edge[export]' "
            "or pass --model FILE"
        ) from None
    return out


def _synthetic_image(folder: Path) -> Path:
    p = folder / "part.png"
    Image.fromarray(make_part(np.random.default_rng(0), defect=True)).save(p)
    return p


@common.command(app)
def bench(
    model: Annotated[
        list[Path] | None,
        typer.Option(help="ONNX model(s); default: export wrn50 (random) and Lite0."),
    ] = None,
    image: Annotated[
        Path | None, typer.Option(help="Image to time (default: a synthetic part image).")
    ] = None,
    k: Annotated[
        list[int] | None, typer.Option("--k", min=1, help="K values (default 5 and 50).")
    ] = None,
    n_gallery: Annotated[
        int | None,
        typer.Option(min=1, help="Gallery size (random features); default 64 (CPU), 1000 (CUDA)."),
    ] = None,
    repeats: Annotated[int, typer.Option(min=1)] = 5,
    matcher: Annotated[
        str,
        typer.Option(
            help="CPU: end-to-end matcher (auto, numpy, exact-int8, exact-bf16); "
            "cuda: device times."
        ),
    ] = "auto",
    compare_torch_: Annotated[
        bool,
        typer.Option(
            "--compare-torch",
            help="Also time a plain torch reference of the protocol (needs [export]) and the "
            "exact/bf16 configurations, interleaved in one run; prints the speed-ups.",
        ),
    ] = False,
    images: Annotated[
        int,
        typer.Option(
            min=1,
            help="--compare-torch: test images per repeat (torch runs them in batches of 8), "
            "taken from the --image's folder tree.",
        ),
    ] = 8,
    config: Annotated[
        list[str] | None,
        typer.Option(
            "--config",
            help="--compare-torch: only these configurations (labels as printed; repeatable).",
        ),
    ] = None,
    stages: Annotated[
        bool, typer.Option("--stages/--no-stages", help="CPU: time the per-stage table.")
    ] = True,
    backbone: Annotated[
        list[CudaShapes] | None,
        typer.Option(help="CUDA: backbone shapes to time (default wrn50 and efficientnet_lite0)."),
    ] = None,
    sweep: Annotated[
        bool, typer.Option("--sweep", help="CUDA: also time every fused-kernel block-rows variant.")
    ] = False,
    gemm: Annotated[
        bool, typer.Option("--gemm/--no-gemm", help="CUDA: compare with a cuBLAS GEMM (CuPy).")
    ] = True,
    json_out: Annotated[Path | None, typer.Option("--json")] = None,
) -> None:
    """Median stage latencies, end to end, peak RSS; floor = backbone + FLOPs / fastest unit."""
    common.check_output_file(json_out, "--json")
    ks = tuple(k or (5, 50))
    con = Console(width=max(120, Console().width))
    selection = select().to_dict()
    con.print(
        f"auto-selection: backend {selection['backend']}, matcher {selection['matcher']} "
        f"({selection['reason']}); CPU units {selection['cpu']['matrix_flags']} "
        f"from {selection['cpu']['source']}",
        markup=False,
    )
    if matcher == "cuda":
        names = [b.value for b in backbone] if backbone else ["wrn50", "efficientnet_lite0"]
        shapes = [cuda_bench.BACKBONES[b] for b in names]
        variants: list[int | None] = [None, 128, 64, 32, 16] if sweep else [None]
        rows = []
        for s in shapes:
            rows += cuda_bench.bench_cuda_matcher(
                s,
                k=list(ks),
                n_gallery=n_gallery or 1000,
                repeats=repeats,
                gemm=gemm,
                block_rows=variants,
            )
    else:
        with tempfile.TemporaryDirectory(prefix="spade-bench-") as tmp:
            models = list(model or [])
            if not models:
                models = [_export(b, Path(tmp)) for b in ("wrn50", "efficientnet_lite0")]
            img = image or _synthetic_image(Path(tmp))
            peaks = matrix_peaks()
            con.print(
                "matrix-unit peaks (GOP/s): "
                + ", ".join(f"{u} {peaks[u]:.0f}" for u in ("fp32", "int8", "bf16") if u in peaks)
                + (f" (bf16 hint ran as {peaks['bf16_runs']})" if "bf16_runs" in peaks else "")
                + f"; floor uses {peaks['best']}",
                markup=False,
            )
            rows = []
            for m in models if stages else []:
                rows += bench_cpu(
                    m,
                    img,
                    ks=ks,
                    n_gallery=n_gallery or 64,
                    repeats=repeats,
                    peaks=peaks,
                    matcher=matcher,
                )
            if compare_torch_:
                rows += _compare(models, img, images, ks, n_gallery or 64, repeats, con, config)
    stage_rows = [r for r in rows if "table" not in r]
    if stage_rows:
        keys = list(dict.fromkeys(key for r in stage_rows for key in r))
        t = Table(title=f"spade-bench ({matcher}), medians of {repeats}")
        t.add_column("stage")
        for r in stage_rows:
            t.add_column(f"{r.get('backbone', '')} K={r.get('k', '')}", justify="right")
        for key in keys:
            if key in ("backbone", "k"):
                continue
            t.add_row(key, *[_fmt(r.get(key)) for r in stage_rows])
        con.print(t)
    if json_out:
        report = {"auto_selection": selection, "rows": rows}
        common.atomic_write_text(json_out, common.json_text(report, indent=2) + "\n")


def _compare(
    models: list[Path],
    img: Path,
    n_images: int,
    ks: tuple[int, ...],
    n_gallery: int,
    repeats: int,
    con: Console,
    labels: list[str] | None = None,
) -> list[dict]:
    """--compare-torch: spade-edge configurations vs the plain torch reference, one run.

    Test images: every image under the --image's category test folder (MVTec layout), else
    the --image itself, cycled to ``n_images``.
    """
    test_dir = img.parent.parent
    pool = sorted(test_dir.rglob("*.png")) if test_dir.name == "test" else [img]
    step = max(1, len(pool) // n_images)
    chosen = (pool[::step] * n_images)[:n_images]
    configs = COMPARE_CONFIGS
    if labels:
        unknown = sorted(set(labels) - {c[0] for c in COMPARE_CONFIGS})
        if unknown:
            raise InputError(
                f"--config {unknown[0]!r} is not one of: {', '.join(c[0] for c in configs)}"
            )
        configs = tuple(c for c in COMPARE_CONFIGS if c[0] in labels)
    rows = []
    for m in models:
        rows += compare_torch(
            m, chosen, ks=ks, n_gallery=n_gallery, repeats=repeats, configs=configs
        )
    t = Table(title=f"--compare-torch: ms per test image ({n_images} images, medians of {repeats})")
    for col in ("backbone", "K", "configuration", "ms / image", "x torch"):
        t.add_column(col, justify="right" if col in ("K", "ms / image", "x torch") else "left")
    for r in rows:
        if "error" in r:
            t.add_row(r["backbone"], str(r["k"]), r["configuration"], "-", escape(r["error"][:60]))
        else:
            t.add_row(
                r["backbone"],
                str(r["k"]),
                r["configuration"],
                f"{r['ms_per_image']:.1f}",
                f"{r['speedup_vs_torch']:.2f}",
            )
    con.print(t)
    return [{**r, "table": "compare_torch"} for r in rows]


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if v < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


main = common.make_main(app)

if __name__ == "__main__":
    main()
