"""`spade-eval MODEL DATA_DIR`: image AUROC, pixel AUROC and AUPRO@0.3 on MVTec-layout data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from spade_edge.cli import _common as common
from spade_edge.cli import options as opt
from spade_edge.runtime.evaluate import evaluate

app = common.new_app()


@common.command(app)
def evaluate_cmd(
    model: opt.Model,
    data_dir: Annotated[
        Path, typer.Argument(help="Category folder: train/good, test/*, ground_truth/*.")
    ],
    gallery: Annotated[
        Path | None, typer.Option(help="Use this gallery instead of packing train/good.")
    ] = None,
    k: opt.K = None,
    k_image: opt.KImage = None,
    k_gallery: opt.KGallery = None,
    backend: opt.Backend = "auto",
    matcher: opt.Matcher = "numpy",
    batch_size: Annotated[int, opt.batch_size("Images per inference batch.")] = 8,
    far: Annotated[
        float, opt.far("False-alarm rate for thresholds from train/good (0 = skip).")
    ] = 0.01,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Reproduce the SPADE protocol's numbers on real data."""
    common.check_output_file(json_out, "--json")
    ki, kg = opt.resolve_k(k, k_image, k_gallery)
    report = evaluate(
        model,
        data_dir,
        k_image=ki or 5,
        k_gallery=kg or 5,
        matcher=matcher,
        backend=backend,
        gallery=gallery,
        batch_size=batch_size,
        far=far or None,
    )
    t = Table(
        title=common.text(
            f"SPADE on {data_dir} (K image {report['k_image']}, gallery {report['k_gallery']})"
        )
    )
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        t.add_row(key, f"{report[key]:.4f}")
    for key in (
        "test_false_positive_rate",
        "test_false_negative_rate",
        "test_pixel_false_positive_rate",
        "test_pixel_true_positive_rate",
    ):
        if key in report:
            t.add_row(key, f"{report[key]:.4f}")
    t.add_row("ms per test image", f"{report['seconds']['per_test_image_ms']:.1f}")
    common.out_console.print(t)
    if json_out is not None:
        common.atomic_write_text(json_out, common.json_text(report, indent=2) + "\n")


main = common.make_main(app)

if __name__ == "__main__":
    main()
