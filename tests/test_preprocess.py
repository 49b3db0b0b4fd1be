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


# --- issue 11: bounded memory, explicit value conventions, honest decode errors -------------


def _png_header(w: int, h: int, color: int = 6, depth: int = 8) -> bytes:
    """A PNG with a real IHDR and a token IDAT: Pillow reads its size, decoding would fail."""
    import struct
    import zlib

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 9))


def test_extreme_aspect_refused_before_decoding(tmp_path: Path) -> None:
    Image.new("RGB", (1, 20000), (90, 120, 200)).save(tmp_path / "strip.png")
    with pytest.raises(InputError, match=r"strip\.png: aspect ratio of 1x20000"):
        prepare_path(tmp_path / "strip.png", C)
    with pytest.raises(InputError, match="aspect ratio"):
        prepare_any(np.zeros((10, 400), np.uint8), C)
    p = prepare_any(np.zeros((10, 320), np.uint8), C)  # 32:1 is still inspected
    assert p.geometry.resized_width == 36 * 32


def test_decode_memory_bound_from_header(tmp_path: Path) -> None:
    from spade_edge.runtime import preprocess as pre

    (tmp_path / "rgba.png").write_bytes(_png_header(9000, 9000, color=6))  # 81 Mpx RGBA
    with pytest.raises(ImageDecodeError, match=r"rgba\.png: image too large to decode"):
        prepare_path(tmp_path / "rgba.png", C)
    (tmp_path / "huge.png").write_bytes(_png_header(12000, 12000, color=0))  # 144 Mpx gray
    with pytest.raises(ImageDecodeError, match=r"huge\.png: image too large"):
        prepare_path(tmp_path / "huge.png", C)
    # 100 Mpx of 8-bit gray or RGB is within the bound; 4-channel stops at 64 Mpx
    assert pre.decode_bytes(10000, 10000, "L") <= pre.MAX_DECODE_BYTES
    assert pre.decode_bytes(10000, 10000, "RGB") <= pre.MAX_DECODE_BYTES
    assert pre.decode_bytes(8000, 8000, "RGBA") <= pre.MAX_DECODE_BYTES
    assert pre.decode_bytes(9000, 9000, "F") > pre.MAX_DECODE_BYTES


def test_pillow_bomb_warning_never_leaks(tmp_path: Path) -> None:
    import warnings

    (tmp_path / "w.png").write_bytes(_png_header(9500, 9500, color=0))  # 90 Mpx: Pillow warns
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ImageDecodeError, match=r"w\.png: corrupt or truncated"):
            prepare_path(tmp_path / "w.png", C)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_single_channel_path_is_bitwise_the_rgb_path() -> None:
    from spade_edge.runtime.preprocess import preprocess

    rng = np.random.default_rng(3)
    gray = Image.fromarray(rng.integers(0, 255, (45, 70), dtype=np.uint8))
    bits = gray.convert("1")
    for im in (gray, bits):
        a = preprocess(im, C)
        b = preprocess(im.convert("RGB"), C)
        assert np.array_equal(a.tensor, b.tensor) and np.array_equal(a.rgb, b.rgb)


def test_non_finite_float_image_is_an_input_error(tmp_path: Path) -> None:
    for name, value in (("nan.tif", np.nan), ("inf.tif", np.inf)):
        a = np.full((40, 40), 100.0, np.float32)
        a[3, 5] = value
        Image.fromarray(a, mode="F").save(tmp_path / name)
        with pytest.raises(InputError, match=rf"{name}: image holds non-finite values"):
            prepare_path(tmp_path / name, C)
    ok = np.random.default_rng(2).uniform(0, 255, (40, 40)).astype(np.float32)
    Image.fromarray(ok, mode="F").save(tmp_path / "ok.tif")
    ref = _reference(np.repeat(ok.round().astype(np.uint8)[:, :, None], 3, axis=2))
    np.testing.assert_allclose(prepare_path(tmp_path / "ok.tif", C).tensor, ref, atol=0.03)


def test_array_value_convention_is_explicit() -> None:
    rng = np.random.default_rng(4)
    u8 = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    ref = prepare_any(u8, C).tensor
    # float in [0, 1] is the same picture; uint16 and explicit white levels too
    np.testing.assert_array_equal(prepare_any(u8 / np.float32(255), C).tensor, ref)
    np.testing.assert_array_equal(prepare_any(u8.astype(np.float64) / 255, C).tensor, ref)
    np.testing.assert_array_equal(prepare_any(u8.astype(np.float32), C, white=255).tensor, ref)
    np.testing.assert_array_equal(prepare_any(u8.astype(np.int16), C, white=255).tensor, ref)
    np.testing.assert_array_equal(prepare_any(u8.astype(np.uint16) * 257, C).tensor, ref)
    # one pixel above 1.0 no longer flips the scale: it is refused
    f = u8 / np.float32(255)
    f[0, 0, 0] = 1.0001
    with pytest.raises(InputError, match=r"outside \[0, 1\]"):
        prepare_any(f, C)
    with pytest.raises(InputError, match="non-finite"):
        prepare_any(np.full((224, 224), np.nan, np.float32), C)
    with pytest.raises(InputError, match="non-finite"):
        prepare_any(np.full((224, 224, 3), np.inf, np.float32), C, white=255)
    with pytest.raises(InputError, match="explicit white level"):
        prepare_any(u8.astype(np.int16), C)
    with pytest.raises(InputError, match=r"outside \[0, 4095\]"):
        prepare_any(np.full((40, 40), -1, np.int16), C, white=4095)
    with pytest.raises(InputError, match="dtype bool"):
        prepare_any(np.ones((40, 40), bool), C)
    with pytest.raises(InputError, match="not an image"):
        prepare_any(np.zeros((40, 40, 2), np.uint8), C)
    with pytest.raises(InputError, match="empty image"):
        prepare_any(np.zeros((0, 40), np.uint8), C)
    with pytest.raises(InputError, match="white level"):
        prepare_any(u8, C, white=float("nan"))
    # grayscale forms agree: HxW, HxWx1, and RGBA drops alpha
    g = u8[:, :, 0]
    t = prepare_any(g, C).tensor
    np.testing.assert_array_equal(prepare_any(g[:, :, None], C).tensor, t)
    # (2-D float keeps its precision through the resize: close to the 8-bit path, not equal)
    np.testing.assert_allclose(prepare_any(g / np.float32(255), C).tensor, t, atol=0.03)
    rgba = np.dstack([u8, np.zeros((40, 50), np.uint8)])
    np.testing.assert_array_equal(prepare_any(rgba, C).tensor, ref)


def test_large_jpeg_decodes_at_reduced_scale(tmp_path: Path, monkeypatch) -> None:
    from spade_edge.runtime import preprocess as pre

    rng = np.random.default_rng(5)
    small = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((800, 600), Image.Resampling.BILINEAR)
    big.save(tmp_path / "big.jpg", quality=95)
    exact = prepare_path(tmp_path / "big.jpg", C)
    monkeypatch.setattr(pre, "DRAFT_PIXELS", 100_000)  # 480 kpx counts as large now
    drafted = prepare_path(tmp_path / "big.jpg", C)
    g = drafted.geometry
    assert (g.width, g.height) == (800, 600)  # geometry of the original, not of the draft
    assert g == pre.replace(
        exact.geometry, display_width=g.display_width, display_height=g.display_height
    )
    assert drafted.rgb.shape[1] < 800  # decoded at 1/2 or 1/4 scale (>= 4 x 36 px kept)
    assert np.abs(drafted.tensor - exact.tensor).mean() < 0.05


def test_decode_errors_say_what_is_wrong(tmp_path: Path, monkeypatch) -> None:
    import os

    from spade_edge.runtime import preprocess as pre

    Image.new("RGB", (20, 20)).save(tmp_path / "ok.png")
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    with pytest.raises(InputError, match=r"a\.png: symbolic link loop"):
        prepare_path(tmp_path / "a.png", C)
    with pytest.raises(InputError, match=r"a\.png: symbolic link loop"):
        list_images([tmp_path / "a.png"])
    os.mkfifo(tmp_path / "fifo.png")  # a FIFO would block a reader: refused from stat()
    with pytest.raises(InputError, match=r"fifo\.png: not a regular file"):
        prepare_path(tmp_path / "fifo.png", C)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(InputError, match=r"dir\.png: a folder"):
        prepare_path(tmp_path / "dir.png", C)

    # permission denied: tests run as root, which reads any file, so the open() is made to
    # fail the way it does for a non-root user (EACCES)
    def denied(*a: object, **k: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pre, "open", denied, raising=False)
    with pytest.raises(InputError, match=r"ok\.png: permission denied") as ei:
        prepare_path(tmp_path / "ok.png", C)
    assert not isinstance(ei.value, ImageDecodeError)  # not "corrupt or truncated"


def test_one_suffix_list_for_files_and_folders(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "a.gif")
    (tmp_path / "notes.txt").write_text("x")
    assert list_images([tmp_path]) == [tmp_path / "a.gif"]
    assert list_images([tmp_path / "a.gif"]) == [tmp_path / "a.gif"]
    with pytest.raises(InputError, match=r"notes\.txt: not a supported image type"):
        list_images([tmp_path / "notes.txt"])
    assert prepare_path(tmp_path / "a.gif", C).tensor.shape == (3, 32, 32)


def test_read_ahead_keeps_order_and_a_bounded_window() -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from spade_edge.runtime.preprocess import read_ahead

    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        return i * i

    with ThreadPoolExecutor(2) as pool:
        gen = read_ahead(range(100), work, pool, window=5)
        got = []
        for i, fut in gen:
            got.append((i, fut.result()))
            assert len(started) <= len(got) + 5  # never more than the window ahead
            if i == 9:
                break
        gen.close()
    assert got == [(i, i * i) for i in range(10)]
    assert len(started) <= 15


def test_bytes_bodies_get_the_same_bounds(tmp_path: Path) -> None:
    """An HTTP body (spade-serve) is checked exactly like a file."""
    from spade_edge.runtime.preprocess import prepare_bytes

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40), np.nan, np.float32), mode="F").save(buf, format="TIFF")
    with pytest.raises(InputError, match="body: image holds non-finite values"):
        prepare_bytes(buf.getvalue(), C, "body")
    with pytest.raises(InputError, match="body: aspect ratio"):
        prepare_bytes(_png_header(1, 20000, color=2), C, "body")
    with pytest.raises(ImageDecodeError, match="body: image too large to decode"):
        prepare_bytes(_png_header(9000, 9000, color=6), C, "body")
