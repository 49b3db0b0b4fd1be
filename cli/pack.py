"""``spade-pack MODEL NORMAL_IMAGES... -o gallery.bin``: build a gallery from normal images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from spade_edge.cli import _common as common
from spade_edge.cli import options as opt
from spade_edge.runtime.fileio import display_name
from spade_edge.runtime.packer import pack

app = common.new_app(
    "Pack the features of normal (defect-free) images into a spade-edge gallery file.",
    no_args_is_help=True,
)


@common.command(app)
def pack_command(
    model: Annotated[
        Path,
        typer.Argument(metavar="MODEL", help="Exported spade-edge model (.onnx) or engine file."),
    ],
    images: Annotated[
        list[Path],
        typer.Argument(
            metavar="NORMAL_IMAGES", help="Normal images and/or folders (searched recursively)."
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Gallery file to write.")],
    batch_size: Annotated[int, opt.batch_size("Images per inference batch.")] = 8,
    backend: Annotated[str, typer.Option("--backend", help="auto | ort | ort-gpu | trt")] = "auto",
    add_to: Annotated[
        Path | None,
        typer.Option("--add-to", help="Existing gallery to extend (the union is written to -o)."),
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Re-open the result and check every checksum.")
    ] = False,
    skip_bad: Annotated[
        bool,
        typer.Option("--skip-bad", help="Skip unreadable images with a warning, do not fail."),
    ] = False,
    skip_duplicates: Annotated[
        bool, typer.Option("--skip-duplicates", help="Skip images whose content is packed.")
    ] = False,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")
    ] = True,
    far: Annotated[
        float | None,
        opt.far(
            "Store thresholds at this false-alarm rate on the normal images "
            "(leave-one-out, needs >= 10 images; 0 = none; default 0.01, or the base "
            "gallery's settings with --add-to). Computed before the gallery is written."
        ),
    ] = None,
) -> None:
    """Run MODEL over NORMAL_IMAGES and write their fp16 features to a gallery."""
    common.check_output_file(output, "-o")
    # the CLI prints the skips itself; keep the library's log records from printing twice
    logging.getLogger("spade_edge.runtime.packer").addHandler(logging.NullHandler())
    r = pack(
        model,
        images,
        output,
        batch_size=batch_size,
        backend=backend,
        progress=progress,
        base_gallery=add_to,
        skip_bad=skip_bad,
        skip_duplicates=skip_duplicates,
        verify=verify,
        far=far,
    )
    for _name, why in r.skipped_bad:
        common.warn(f"skipped {display_name(why)}")  # the reason names the file
    for name, other in r.skipped_duplicates:
        common.warn(f"skipped {display_name(name)}: same content as {display_name(other)}")
    t = Table(title=common.text(f"gallery written: {display_name(str(r.path))}"), show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("images in gallery", str(r.n_images))
    t.add_row("added now", f"{r.n_added}" + (f" (base had {r.n_base})" if r.n_base else ""))
    if r.skipped_bad or r.skipped_duplicates:
        t.add_row("skipped", f"{len(r.skipped_bad)} unreadable, {len(r.skipped_duplicates)} dup.")
    t.add_row("file size", f"{r.file_bytes / 1e6:.2f} MB ({r.bytes_per_image / 1e3:.1f} kB/image)")
    t.add_row("time", f"{r.seconds:.2f} s ({r.images_per_second:.1f} images/s)")
    t.add_row("backbone time", f"{r.infer_seconds:.2f} s ({r.backend})")
    t.add_row("model fingerprint", r.fingerprint)
    if verify:
        t.add_row("verified", "all SHA-256 checksums match")
    th = r.thresholds
    if th is not None:
        t.add_row(
            "thresholds",
            f"image {th['image']:.4g}, pixel {th['pixel']:.4g} (false-alarm rate "
            f"{th['far']:g}, K={th['k_image']}, leave-one-out on {th['n_normal']} images)",
        )
    elif r.thresholds_note:
        common.warn(f"{display_name(str(output))}: {r.thresholds_note}")
    common.out_console.print(t)


main = common.make_main(app)

if __name__ == "__main__":  # pragma: no cover
    main()
