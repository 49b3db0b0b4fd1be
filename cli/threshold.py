"""`spade-threshold GALLERY`: store anomaly thresholds computed from the gallery's normal images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spade_edge.cli._common import (
    KGalleryOpt,
    KImageOpt,
    KOpt,
    check_output_file,
    far_opt,
    handle_errors,
    json_text,
    make_main,
    resolve_k,
)
from spade_edge.runtime.gallery import Gallery
from spade_edge.runtime.progress import counting
from spade_edge.runtime.thresholds import calibrate_gallery

app = typer.Typer(add_completion=False)


@app.command()
@handle_errors
def threshold(
    gallery: Annotated[Path, typer.Argument(help="Gallery file from spade-pack.")],
    out: Annotated[
        Path | None, typer.Option("-o", "--out", help="Write here (default: replace GALLERY).")
    ] = None,
    far: Annotated[
        float,
        far_opt("False-alarm rate on normal parts (image and mask level).", allow_zero=False),
    ] = 0.01,
    k: KOpt = None,
    k_image: KImageOpt = None,
    k_gallery: KGalleryOpt = None,
) -> None:
    """Leave-one-out over normal images -> image and pixel thresholds in the gallery manifest."""
    check_output_file(out if out is not None else gallery, "-o" if out is not None else "GALLERY")
    ki, kg = resolve_k(k, k_image, k_gallery)
    with Gallery.open(gallery) as g:
        n = g.n_images
    with counting(n, "leave-one-out") as advance:
        th = calibrate_gallery(gallery, out, far=far, k_image=ki, k_gallery=kg, progress=advance)
    typer.echo(json_text(th))


main = make_main(app)

if __name__ == "__main__":
    main()
