"""Decode and preprocessing: every input mode a camera or a folder may give us."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade_edge.runtime.contract import Contract, Level
from spade_edge.runtime.errors import ImageDecodeError, InputError
from spade_edge.runtime.preprocess import list_images, prepare_any, prepare_path, resized_size

C = Contract(
    backbone="t",
    weights="w",
    levels=(Level("l", 4, 8, 8, 8),),
    pooled_dim=8,
    image_size=32,
    resize=36,
)


def _reference(rgb: np.ndarray) -> np.ndarray:
    """Straight from the protocol text: resize shorter side, centre crop, /255, mean/std."""
    im = Image.fromarray(rgb)
    rw, rh = resized_size(im.width, im.height, 36)
    r = np.asarray(im.resize((rw, rh), Image.Resampling.BILINEAR), dtype=np.float64) / 255
    top, left = round((rh - 32) / 2), round((rw - 32) / 2)
    crop = r[top : top + 32, left : left + 32]
    return ((crop - np.array(C.mean)) / np.array(C.std)).transpose(2, 0, 1)


def test_rgb_matches_protocol_and_geometry() -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8)
    p = prepare_any(rgb, C)
    np.testing.assert_allclose(p.tensor, _reference(rgb), atol=1e-5)
    g = p.geometry
    assert (g.width, g.height, g.resized_width, g.resized_height) == (80, 50, 57, 36)
    assert (g.left, g.top) == (12, 2)


def test_modes_gray_rgba_palette_16bit(tmp_path: Path) -> None:
    gray = np.random.default_rng(1).integers(0, 255, (40, 40), dtype=np.uint8)
    rgb3 = np.repeat(gray[:, :, None], 3, axis=2)
    expected = _reference(rgb3)
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_allclose(prepare_path(tmp_path / "g.png", C).tensor, expected, atol=1e-5)
    rgba = np.dstack([rgb3, np.full((40, 40), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_allclose(prepare_path(tmp_path / "a.png", C).tensor, expected, atol=1e-5)
    Image.fromarray(rgb3).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(
        tmp_path / "p.png"
    )
    pal = prepare_path(tmp_path / "p.png", C).tensor
    assert pal.shape == (3, 32, 32) and np.abs(pal - expected).mean() < 0.05
    g16 = gray.astype(np.uint16) * 257  # same picture at 16 bits
    Image.fromarray(g16).save(tmp_path / "g16.png")
    im16 = Image.open(tmp_path / "g16.png")
    assert im16.mode.startswith("I")
    np.testing.assert_allclose(prepare_path(tmp_path / "g16.png", C).tensor, expected, atol=2e-2)


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :10] = 255  # bright stripe on the left
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    (tmp_path / "r.jpg").write_bytes(buf.getvalue())
    p = prepare_path(tmp_path / "r.jpg", C)
    assert (p.geometry.width, p.geometry.height) == (40, 60)  # upright: portrait
    assert p.rgb[:10].mean() > 200 and p.rgb[-10:].mean() < 50  # stripe now at the top


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "t.png").write_bytes(b"\x89PNG\r\n\x1a\nxxxx")
    with pytest.raises(ImageDecodeError, match=r"t\.png"):
        prepare_path(tmp_path / "t.png", C)
    with pytest.raises(InputError, match=r"nope\.png"):
        prepare_path(tmp_path / "nope.png", C)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        list_images([tmp_path / "empty"])
    Image.new("RGB", (20, 20)).save(tmp_path / "ok.png")
    full = Image.new("RGB", (20, 20))
    buf = io.BytesIO()
    full.save(buf, format="PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[:40])
    with pytest.raises(ImageDecodeError, match=r"trunc\.png"):
        prepare_path(tmp_path / "trunc.png", C)
