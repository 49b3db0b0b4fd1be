"""`spade-bench`: per-stage latency against the hardware floor (CPU), or device times (CUDA)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from spade_edge.runtime.cli._common import atomic_write_text, make_main
from spade_edge.runtime.errors import BackendUnavailableError

app = typer.Typer(add_completion=False)
BOTTLE = Path("../shared/data/mvtec_ad/bottle/test/broken_large/000.png")


def _export(backbone: str, folder: Path) -> Path:
    try:
        from spade_edge.export.onnx_export import export_onnx
    except ImportError:
        raise BackendUnavailableError(
            "spade-bench exports its models with torch: pip install 'spade-edge[export]' "
            "or pass --model FILE"
        ) from None
    out = folder / f"{backbone}.onnx"
    weights = "imagenet" if backbone.startswith("efficientnet") else "random"
    export_onnx(backbone, out, weights=weights)
    return out


def _synthetic_image(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    from spade_edge.export.demo import make_part

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
        Path | None, typer.Option(help="Image to time (default: a bottle image).")
    ] = None,
    k: Annotated[list[int] | None, typer.Option("--k", help="K values (default 5 and 50).")] = None,
    n_gallery: Annotated[int, typer.Option(help="Gallery size (random features).")] = 64,
    repeats: Annotated[int, typer.Option(min=1)] = 5,
    matcher: Annotated[
        str, typer.Option(help="numpy (CPU pipeline) or cuda (device times).")
    ] = "numpy",
    json_out: Annotated[Path | None, typer.Option("--json")] = None,
) -> None:
    """Median stage latencies, end to end, peak RSS; floor = backbone + FLOPs / GEMM rate."""
    ks = tuple(k or (5, 50))
    con = Console(width=max(120, Console().width))
    if matcher == "cuda":
        try:
            from spade_edge.runtime.matchers import cuda_bench
        except ImportError as e:
            raise BackendUnavailableError(f"CUDA benchmark unavailable here: {e}") from None
        rows = cuda_bench.run_default(ks=ks, repeats=repeats)
    else:
        from spade_edge.runtime.bench import bench_cpu, gemm_gflops

        with tempfile.TemporaryDirectory(prefix="spade-bench-") as tmp:
            models = list(model or [])
            if not models:
                models = [_export(b, Path(tmp)) for b in ("wrn50", "efficientnet_lite0")]
            img = image or (BOTTLE if BOTTLE.is_file() else _synthetic_image(Path(tmp)))
            rate = gemm_gflops()
            rows = []
            for m in models:
                rows += bench_cpu(
                    m, img, ks=ks, n_gallery=n_gallery, repeats=repeats, gemm_rate=rate
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
