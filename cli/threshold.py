"""`spade-threshold GALLERY`: store anomaly thresholds computed from the gallery's normal images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spade_edge.cli import _common as common
from spade_edge.cli import options as opt
from spade_edge.runtime.gallery import Gallery
from spade_edge.runtime.progress import counting
from spade_edge.runtime.thresholds import calibrate_gallery

app = common.new_app()


@common.command(app)
def threshold(
    gallery: opt.Gallery,
    out: Annotated[
        Path | None, typer.Option("-o", "--out", help="Write here (default: replace GALLERY).")
    ] = None,
    far: Annotated[
        float,
        opt.far("False-alarm rate on normal parts (image and mask level).", allow_zero=False),
    ] = 0.01,
    k: opt.K = None,
    k_image: opt.KImage = None,
    k_gallery: opt.KGallery = None,
) -> None:
    """Leave-one-out over normal images -> image and pixel thresholds in the gallery manifest."""
    common.check_output_file(
        out if out is not None else gallery, "-o" if out is not None else "GALLERY"
    )
    ki, kg = opt.resolve_k(k, k_image, k_gallery)
    with Gallery.open(gallery) as g:
        n = g.n_images
    with counting(n, "leave-one-out") as advance:
        th = calibrate_gallery(gallery, out, far=far, k_image=ki, k_gallery=kg, progress=advance)
    typer.echo(common.json_text(th))


main = common.make_main(app)

if __name__ == "__main__":
    main()
