"""Synthetic part images for `spade demo` and `spade bench` (no data set needed).

A "part" is a machined ring seen from above, with small pose and lighting variation; the defective
variant adds a scratch and a dark pit. NumPy and Pillow only, so the lean install can use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

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
