"""`spade-triton MODEL GALLERY -o REPO`: a Triton model repository (one more version per call)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from spade_edge.cli import _common as common
from spade_edge.cli import options as opt
from spade_edge.runtime.errors import InputError
from spade_edge.triton.repository import RepoOptions, write_repository
from spade_edge.triton.server import load_model

app = common.new_app()


def parse_gpus(text: str | None) -> tuple[int, ...]:
    """``"0,1"`` -> ``(0, 1)``; errors name the option."""
    if not text:
        return ()
    try:
        gpus = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--gpus {text!r}: expected GPU indices like 0,1") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise InputError(f"--gpus {text!r}: indices must be distinct and >= 0")
    return gpus


@common.command(app)
def triton(
    model: Annotated[Path, typer.Argument(help="Exported ONNX model (spade-export).")],
    gallery: opt.Gallery,
    out: Annotated[Path, typer.Option("-o", "--out", help="Model repository folder.")],
    instances: Annotated[int, typer.Option(min=1, help="Model instances (per GPU).")] = 1,
    kind: Annotated[
        str, typer.Option(help="cpu (ONNX Runtime + NumPy) or gpu (TensorRT/ORT-GPU + CUDA).")
    ] = "cpu",
    gpus: Annotated[
        str | None, typer.Option(help="GPU indices for --kind gpu, e.g. 0,1 (default: all).")
    ] = None,
    engine: Annotated[
        Path | None, typer.Option(help="TensorRT engine built from MODEL, for GPU instances.")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="Runner of the instances (default: ort on CPU; trt/ort-gpu on GPU)."),
    ] = None,
    matcher: Annotated[
        str | None, typer.Option(help="kNN backend (default: numpy on CPU, cuda on GPU).")
    ] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Triton max_batch_size.")] = 8,
    max_queue_delay_us: Annotated[
        int, typer.Option(min=0, help="dynamic_batching max_queue_delay_microseconds.")
    ] = 2000,
    k: opt.K = None,
    k_image: opt.KImage = None,
    k_gallery: opt.KGallery = None,
    version: Annotated[
        int | None, typer.Option(min=1, help="Version number (default: the next one).")
    ] = None,
    backbone: Annotated[
        bool, typer.Option(help="Also write spade_backbone (for `spade-run --triton`).")
    ] = True,
    bundle: Annotated[
        bool, typer.Option(help="Copy spade_edge's code into the version (site/).")
    ] = True,
    load: Annotated[
        str | None,
        typer.Option(help="HOST:PORT (HTTP) of a running server: load the new version now."),
    ] = None,
) -> None:
    """Write MODEL + GALLERY as the next version of model `spade` in a Triton repository."""
    common.check_output_dir(out, "--out")
    ki, kg = opt.resolve_k(k, k_image, k_gallery)
    opts = RepoOptions(
        instances=instances,
        kind=kind,
        gpus=parse_gpus(gpus),
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        k_image=ki,
        k_gallery=kg,
        matcher=matcher,
        backend=backend,
        engine=engine,
        backbone=backbone,
        bundle=bundle,
        version=version,
    )
    t0 = time.perf_counter()
    wv = write_repository(model, gallery, out, opts)
    rec: dict[str, object] = {
        "repository": str(wv.repository),
        "model": "spade",
        "version": wv.version,
        "folder": str(wv.folder),
        "backbone_version": wv.backbone_version,
        "write_seconds": round(time.perf_counter() - t0, 3),
    }
    if load is not None:
        if wv.backbone_version is not None:
            load_model(load, "spade_backbone")
        rec["load_seconds"] = round(load_model(load, "spade"), 3)
    typer.echo(common.json_text(rec))


main = common.make_main(app)

if __name__ == "__main__":
    main()
