"""Decode and preprocess images exactly as the contract says (torchvision's PIL path, no torch).

Resize the shorter side to ``contract.resize`` with Pillow's antialiased bilinear filter (what
``torchvision.transforms.Resize`` does on PIL images), centre-crop ``image_size`` with
torchvision's rounding, scale to [0, 1] and normalise with the contract's mean/std.
The geometry is kept so an anomaly map can be projected back onto the original image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from spade_edge.runtime.contract import Contract
from spade_edge.runtime.errors import ImageDecodeError, InputError

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
)
#: Refuse absurd images before decoding them (decompression bombs, corrupt headers).
MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class Geometry:
    """How the crop relates to the (EXIF-upright) original: for projecting maps back."""

    width: int  # original, after EXIF transpose
    height: int
    resized_width: int
    resized_height: int
    left: int  # crop offset in the resized image
    top: int
    size: int  # crop side


@dataclass
class Prepared:
    """One preprocessed image: the model input and where it came from."""

    tensor: np.ndarray  # float32 [3, S, S], normalised
    geometry: Geometry
    rgb: np.ndarray  # uint8 [H, W, 3], the upright original (for overlays)
    source: str


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file; every failure is an ImageDecodeError naming it."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if not p.is_file():
        raise InputError(f"{p}: not a file")
    return decode_image(p, str(p))


def decode_image(
    src: str | Path | BinaryIO, name: str, formats: tuple[str, ...] | None = None
) -> Image.Image:
    """Fully decode an image from a path or binary stream with the same bounds as files.

    ``formats``: Pillow format names to accept (the content is sniffed, never a file name or
    a declared type); others are refused. Every failure is an ImageDecodeError naming ``name``.
    """
    try:
        with Image.open(src, formats=formats) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageDecodeError(f"{name}: image too large ({im.width}x{im.height} pixels)")
            im.load()
            return ImageOps.exif_transpose(im) or im
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        what = f"a {', '.join(formats)} image" if formats else "an image Pillow can read"
        raise ImageDecodeError(f"{name}: not {what}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({e})") from None


def to_rgb_float(im: Image.Image) -> tuple[Image.Image | None, np.ndarray | None]:
    """Normalise modes: 8-bit stays a PIL RGB image; 16-bit/float become float32 HxWx3 in [0,255].

    Alpha is dropped (inspection cameras do not use it), palettes are expanded, grayscale is
    replicated to three channels, 16-bit data keeps its precision (scaled by 255/65535).
    """
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float32)
        scale = 255.0 / 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
        a = np.clip(a * scale, 0, 255)
        return None, np.repeat(a[:, :, None], 3, axis=2)
    if mode == "F":
        a = np.clip(np.asarray(im, dtype=np.float32), 0, 255)
        return None, np.repeat(a[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im, None


def resized_size(w: int, h: int, short: int) -> tuple[int, int]:
    # torchvision: the shorter side becomes `short`, the longer int(short * long / short_side)
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def preprocess(im: Image.Image, contract: Contract, source: str = "<image>") -> Prepared:
    """Contract preprocessing of a decoded PIL image."""
    if im.width < 1 or im.height < 1:
        raise ImageDecodeError(f"{source}: empty image")
    pil, flt = to_rgb_float(im)
    w, h = im.width, im.height
    rw, rh = resized_size(w, h, contract.resize)
    s = contract.image_size
    top = round((rh - s) / 2.0)
    left = round((rw - s) / 2.0)
    if pil is not None:
        rgb = np.asarray(pil)
        resized = pil if (rw, rh) == (w, h) else pil.resize((rw, rh), Image.Resampling.BILINEAR)
        crop = np.asarray(resized)[top : top + s, left : left + s]  # uint8, cropped first
    else:
        assert flt is not None
        rgb = flt.round().astype(np.uint8)
        chans = []
        for c in range(3):
            ch = Image.fromarray(np.ascontiguousarray(flt[:, :, c]), mode="F")
            if (rw, rh) != (w, h):
                ch = ch.resize((rw, rh), Image.Resampling.BILINEAR)
            chans.append(np.asarray(ch, dtype=np.float32))
        crop = np.stack(chans, axis=2)[top : top + s, left : left + s]
    # (x/255 - mean) / std as one multiply-add per channel, written straight into CHW layout
    x = np.empty((3, s, s), dtype=np.float32)
    for c in range(3):
        scale = 1.0 / (255.0 * contract.std[c])
        np.multiply(crop[:, :, c], np.float32(scale), out=x[c], casting="unsafe")
        x[c] -= np.float32(contract.mean[c] / contract.std[c])
    geo = Geometry(w, h, rw, rh, left, top, s)
    return Prepared(x, geo, rgb, source)


def prepare_path(path: str | Path, contract: Contract) -> Prepared:
    """Decode + preprocess one file."""
    return preprocess(load_image(path), contract, str(path))


def prepare_bytes(
    data: bytes, contract: Contract, source: str, formats: tuple[str, ...] | None = None
) -> Prepared:
    """Decode + preprocess an image held in memory (an HTTP body), with the file path's bounds."""
    import io

    return preprocess(decode_image(io.BytesIO(data), source, formats), contract, source)


def prepare_any(image: Any, contract: Contract, source: str = "<array>") -> Prepared:
    """Accept a path, a PIL image or a NumPy array (HxW, HxWx3 or HxWx4; uint8/uint16/float)."""
    if isinstance(image, (str, Path)):
        return prepare_path(image, contract)
    if isinstance(image, Image.Image):
        return preprocess(ImageOps.exif_transpose(image) or image, contract, source)
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[2] == 4:
            a = a[:, :, :3]
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
            raise InputError(f"{source}: array of shape {a.shape} is not an image (HxW or HxWx3)")
        if a.dtype == np.uint8:
            return preprocess(Image.fromarray(a), contract, source)
        if a.dtype == np.uint16:
            f = a.astype(np.float32) * (255.0 / 65535.0)
        elif np.issubdtype(a.dtype, np.floating):
            f = a.astype(np.float32) * (255.0 if a.max(initial=0) <= 1.0 else 1.0)
        else:
            raise InputError(f"{source}: unsupported array dtype {a.dtype}")
        if f.ndim == 2:
            return preprocess(Image.fromarray(np.clip(f, 0, 255), mode="F"), contract, source)
        u8 = np.clip(np.round(f), 0, 255).astype(np.uint8)
        return preprocess(Image.fromarray(u8), contract, source)
    raise InputError(f"{source}: unsupported image type {type(image).__name__}")


def list_images(paths: list[str | Path] | tuple[str | Path, ...]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into image files; errors name the path."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                exts = ", ".join(sorted(IMAGE_SUFFIXES))
                raise InputError(f"{p}: folder contains no images ({exts})")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    return out
