"""`spade-bench`: per-stage latency against the hardware floor (CPU), or device times (CUDA)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from PIL import Image
from rich.console import Console
from rich.table import Table

from spade_edge.cli._common import atomic_write_text, make_main
from spade_edge.export.demo import make_part
from spade_edge.export.onnx_export import export_onnx
from spade_edge.runtime.bench import bench_cpu, gemm_gflops
from spade_edge.runtime.errors import BackendUnavailableError
from spade_edge.runtime.matchers import cuda_bench

app = typer.Typer(add_completion=False)


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


@app.command()
def bench(
    model: Annotated[
        list[Path] | None,
        typer.Option(help="ONNX model(s); default: export wrn50 (random) and Lite0."),
    ] = None,
    image: Annotated[
        Path | None, typer.Option(help="Image to time (default: a synthetic part image).")
    ] = None,
    k: Annotated[list[int] | None, typer.Option("--k", help="K values (default 5 and 50).")] = None,
    n_gallery: Annotated[
        int | None,
        typer.Option(help="Gallery size (random features); default 64 (CPU), 1000 (CUDA)."),
    ] = None,
    repeats: Annotated[int, typer.Option(min=1)] = 5,
    matcher: Annotated[
        str, typer.Option(help="numpy (CPU pipeline) or cuda (device times).")
    ] = "numpy",
    backbone: Annotated[
        list[str] | None,
        typer.Option(help="CUDA: backbone shapes to time (wrn50, efficientnet_lite0)."),
    ] = None,
    sweep: Annotated[
        bool, typer.Option("--sweep", help="CUDA: also time every fused-kernel block-rows variant.")
    ] = False,
    gemm: Annotated[
        bool, typer.Option("--gemm/--no-gemm", help="CUDA: compare with a cuBLAS GEMM (CuPy).")
    ] = True,
    json_out: Annotated[Path | None, typer.Option("--json")] = None,
) -> None:
    """Median stage latencies, end to end, peak RSS; floor = backbone + FLOPs / GEMM rate."""
    ks = tuple(k or (5, 50))
    con = Console(width=max(120, Console().width))
    if matcher == "cuda":
        shapes = [cuda_bench.BACKBONES[b] for b in (backbone or ["wrn50", "efficientnet_lite0"])]
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
            rate = gemm_gflops()
            rows = []
            for m in models:
                rows += bench_cpu(
                    m, img, ks=ks, n_gallery=n_gallery or 64, repeats=repeats, gemm_rate=rate
                )
    if rows:
        keys = list(dict.fromkeys(key for r in rows for key in r))
        t = Table(title=f"spade-bench ({matcher}), medians of {repeats}")
        t.add_column("stage")
        for r in rows:
            t.add_column(f"{r.get('backbone', '')} K={r.get('k', '')}", justify="right")
        for key in keys:
            if key in ("backbone", "k"):
                continue
            t.add_row(key, *[_fmt(r.get(key)) for r in rows])
        con.print(t)
    if json_out:
        atomic_write_text(json_out, json.dumps(rows, indent=2) + "\n")


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if v < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


main = make_main(app)

if __name__ == "__main__":
    main()
