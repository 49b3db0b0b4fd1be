"""`spade-run MODEL GALLERY IMAGE... | DIR`: score parts, print verdicts, write defect maps."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from spade_edge.cli import _common as common
from spade_edge.cli import options as opt
from spade_edge.runtime.detector import Detector
from spade_edge.runtime.errors import InputError, SpadeError
from spade_edge.runtime.preprocess import list_images
from spade_edge.runtime.progress import counting
from spade_edge.runtime.records import csv_text, dumps_record, path_fields
from spade_edge.runtime.visualize import save_maps

app = common.new_app()


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:
        stem, n = f"{path.stem}_{n}", n + 1
    used.add(stem)
    return stem


@common.command(app)
def run(
    model: Annotated[
        Path,
        typer.Argument(
            help="Exported ONNX model or TensorRT engine file; with --triton the model's name "
            "on the server (spade_backbone)."
        ),
    ],
    gallery: opt.Gallery,
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders.")],
    k: opt.K = None,
    k_image: opt.KImage = None,
    k_gallery: opt.KGallery = None,
    threshold: Annotated[
        float | None,
        opt.threshold("--threshold", "Image-score threshold (overrides the gallery's)."),
    ] = None,
    pixel_threshold: Annotated[
        float | None,
        opt.threshold("--pixel-threshold", "Pixel threshold for masks (overrides the gallery's)."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write JSON lines here instead of stdout.")
    ] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Also write a CSV table.")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for overlay and mask PNGs per image.")
    ] = None,
    backend: opt.Backend = "auto",
    matcher: opt.Matcher = "numpy",
    batch_size: Annotated[int, opt.batch_size("Images per inference call.")] = 1,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Check the gallery's checksums and finiteness before scoring (default; "
            "cost: docs/reliability.md).",
        ),
    ] = True,
    triton: Annotated[
        str | None,
        typer.Option(
            help="Run the backbone on a Triton server: HOST:PORT (gRPC), grpc:// or http://. "
            "Matching runs here against GALLERY."
        ),
    ] = None,
) -> None:
    """Score images against normal parts: score, verdict and anomaly map per image.

    An image that cannot be read or scored is reported (a line on stderr, an ``error`` record)
    and the others are still scored; the exit code is then that of the first failure
    (2 for an unreadable image). Reports are written once, at the end, atomically.
    """
    common.check_output_file(json_out, "--json")
    common.check_output_file(csv_out, "--csv")
    # the CLI prints the Detector's warnings itself; keep its log records from printing twice
    logging.getLogger("spade_edge.runtime.detector").addHandler(logging.NullHandler())
    paths = list_images(images)
    common.check_output_dir(out, "--out")
    ki, kg = opt.resolve_k(k, k_image, k_gallery)
    runner_options = None
    if triton is not None:
        if backend not in ("auto", "triton"):
            raise InputError(f"--triton runs the backbone remotely; drop --backend {backend}")
        backend, runner_options = "triton", {"url": triton}
    det = Detector.load(
        model,
        gallery,
        backend=backend,
        matcher=matcher,
        k_image=ki,
        k_gallery=kg,
        threshold=threshold,
        pixel_threshold=pixel_threshold,
        verify=verify,
        runner_options=runner_options,
    )
    if det.thresholds_stale:
        common.warn(
            f"{gallery}: stored thresholds were calibrated for other K values; "
            "no verdicts (recalibrate with spade-threshold or pass --threshold)"
        )
    elif det.threshold is None:
        common.warn(f"{gallery}: no thresholds stored; scores only (pass --threshold or calibrate)")
    elif det.thresholds_warning and threshold is None:
        common.warn(f"{gallery}: {det.thresholds_warning}")
    records: list[dict[str, Any]] = []
    used: set[str] = set()
    failed: list[SpadeError] = []
    sink = None if json_out is None else io.StringIO()
    with det, counting(len(paths), "scoring", enabled=len(paths) > 1) as advance:
        for path, res in det.predict_paths(paths, batch_size=batch_size):
            if isinstance(res, SpadeError):
                failed.append(res)
                rec: dict[str, Any] = {**path_fields(path), "error": str(res)}
                common.error(str(res))
            else:
                rec = res.to_record()
                if out is not None:
                    rec |= save_maps(res, out, _unique_stem(path, used))
            line = dumps_record(rec)  # strict JSON, UTF-8-clean, names lossless
            if sink is None:
                typer.echo(line)
            else:
                sink.write(line + "\n")
            records.append(rec)
            advance(1)
    if json_out is not None and sink is not None:
        common.atomic_write_text(json_out, sink.getvalue())
    if csv_out is not None:
        common.atomic_write_text(csv_out, csv_text(records))
    if failed:
        common.error(f"{len(failed)} of {len(paths)} images failed")
        raise typer.Exit(failed[0].exit_code)


main = common.make_main(app)

if __name__ == "__main__":
    main()
