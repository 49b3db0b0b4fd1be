"""Decode and preprocess images exactly as the contract says (torchvision's PIL path, no torch).

Resize the shorter side to ``contract.resize`` with Pillow's antialiased bilinear filter (what
``torchvision.transforms.Resize`` does on PIL images), centre-crop ``image_size`` with
torchvision's rounding, scale to [0, 1] and normalise with the contract's mean/std.
The geometry is kept so an anomaly map can be projected back onto the original image.

Memory per image is bounded by construction (docs/reliability.md): the pixel count and the
aspect ratio are checked from the header before anything is decoded, large JPEGs are decoded
at a reduced DCT scale, single-channel and high-bit-depth images are worked on without a
full-size RGB or float copy, and the copy kept for overlays (``Prepared.rgb``) is at most
``DISPLAY_MAX_PIXELS``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import math
import os
import stat
import threading
import warnings
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from spade_edge.runtime.contract import Contract
from spade_edge.runtime.errors import ImageDecodeError, InputError

#: The one list of file types read, for files named directly and for folders alike.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
)
#: Refuse larger images from the header, before decoding (decompression bombs, corrupt headers).
MAX_PIXELS = 100_000_000
#: Bytes the decoded image plus its working copy (mode conversion) may take: checked from the
#: header and the mode before decoding (``decode_bytes``). 100 Mpx 8-bit gray or RGB fit;
#: 4-channel and 32-bit images fit up to 64 Mpx.
MAX_DECODE_BYTES = 512 * 2**20
#: Longest side / shortest side. The model sees the centre square of the image; beyond this a
#: strip is not an inspection image, and the resized strip would grow without bound.
MAX_ASPECT = 32
#: Cap on the resized image (shorter side -> ``contract.resize``) for any contract.
MAX_RESIZED_PIXELS = 8_000_000
#: Overlays, masks and ``Result.full_map()`` are drawn at the original size up to this many
#: pixels, above it at the original scaled down to fit (same aspect ratio).
DISPLAY_MAX_PIXELS = 16_000_000
#: JPEGs above this are decoded at a reduced DCT scale (``Image.draft``) that keeps the shorter
#: side at least ``DRAFT_MARGIN`` x the contract's resize (exact below it).
DRAFT_PIXELS = 24_000_000
DRAFT_MARGIN = 4
_ROWS_PIXELS = 1 << 20  # row-chunk size for the float / 16-bit passes

# Pillow's DecompressionBombWarning is issued inside Image.open, before our own (stricter) size
# check; catch_warnings is process-global, so our opens take a lock while they hold the filter.
_OPEN_LOCK = threading.Lock()
#: Images above DISPLAY_MAX_PIXELS decode one at a time, so decode threads do not multiply the
#: per-image bound (docs/reliability.md).
_LARGE_DECODE = threading.Lock()


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


#: glibc keeps memory freed by a decode thread in that thread's arena (measured: ~140 MiB of a
#: 64 Mpx RGBA decode stays resident); after a large image it is handed back to the system.
_MALLOC_TRIM = _find_malloc_trim()


def _release_heap(hold: contextlib.ExitStack) -> None:
    if _MALLOC_TRIM is not None:
        hold.callback(_MALLOC_TRIM, 0)  # runs after the image is closed, before the lock is let go


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
    display_width: int = 0  # 0: ``display_size(width, height)``
    display_height: int = 0

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) of overlays, masks and full maps: see ``DISPLAY_MAX_PIXELS``."""
        if self.display_width and self.display_height:
            return self.display_width, self.display_height
        return display_size(self.width, self.height)


@dataclass
class Prepared:
    """One preprocessed image: the model input and where it came from."""

    tensor: np.ndarray  # float32 [3, S, S], normalised
    geometry: Geometry
    rgb: np.ndarray  # uint8 [h, w, 3], the upright original at ``geometry.display_size``
    source: str


def display_size(width: int, height: int) -> tuple[int, int]:
    """The original size, or scaled down to at most ``DISPLAY_MAX_PIXELS`` (aspect kept)."""
    if width * height <= DISPLAY_MAX_PIXELS:
        return width, height
    f = math.sqrt(DISPLAY_MAX_PIXELS / (width * height))
    return max(1, int(width * f)), max(1, int(height * f))


def resized_size(w: int, h: int, short: int) -> tuple[int, int]:
    # torchvision: the shorter side becomes `short`, the longer int(short * long / short_side)
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def crop_geometry(w: int, h: int, contract: Contract) -> Geometry:
    """Resize and centre-crop arithmetic of the contract (torchvision's rounding), in one place."""
    rw, rh = resized_size(w, h, contract.resize)
    s = contract.image_size
    return Geometry(w, h, rw, rh, round((rw - s) / 2.0), round((rh - s) / 2.0), s)


#: Bytes per pixel of decoded image + working copy, by Pillow mode (others: 8).
_WORK_BYTES = {"1": 2, "L": 1, "LA": 5, "La": 5, "P": 5, "RGB": 4, "I;16": 6, "I;16B": 6}
_WORK_BYTES |= {"I;16L": 6, "I;16N": 6, "I": 8, "F": 8, "RGBA": 8, "CMYK": 8, "YCbCr": 8}


def decode_bytes(w: int, h: int, mode: str, transparency: bool = False) -> int:
    """Peak bytes to decode a ``w`` x ``h`` image of ``mode`` and convert it for the model."""
    per = _WORK_BYTES.get(mode, 8) + (4 if mode == "P" and transparency else 0)
    return w * h * per


def check_size(w: int, h: int, source: str) -> None:
    """Refuse images whose decode or resize would need unbounded memory (header sizes suffice)."""
    if w < 1 or h < 1:
        raise ImageDecodeError(f"{source}: empty image ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ImageDecodeError(
            f"{source}: image too large ({w}x{h} = {w * h / 1e6:.0f} Mpx; limit "
            f"{MAX_PIXELS / 1e6:.0f} Mpx)"
        )
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise InputError(
            f"{source}: aspect ratio of {w}x{h} is too extreme to inspect (limit {MAX_ASPECT}:1)"
        )


def _os_error(p: Path, e: OSError) -> InputError:
    why = {
        errno.ENOENT: "no such file",
        errno.ELOOP: "symbolic link loop",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "no such file (a parent is not a folder)",
        errno.ENAMETOOLONG: "file name too long",
    }.get(e.errno or 0, e.strerror or str(e))
    return InputError(f"{p}: {why}")


def _decode(
    src: str | Path | BinaryIO,
    name: str | None = None,
    min_side: int | None = None,
    formats: tuple[str, ...] | None = None,
    hold: contextlib.ExitStack | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode a file or a binary stream; returns the EXIF-upright image and its upright size
    before any draft reduction. Every failure is a typed error naming ``name`` (or the path).

    ``hold``: for an image above ``DISPLAY_MAX_PIXELS`` the large-image lock is entered on it,
    so the caller keeps it until its preprocessing is done."""
    if isinstance(src, (str, Path)):
        p = Path(src)
        name = name or str(p)
        try:
            st = os.stat(p)  # follows links: ELOOP, EACCES, ENOENT each get their own words
        except OSError as e:
            raise _os_error(p, e) from None
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise InputError(f"{p}: {kind}, not an image file")
        try:
            f: BinaryIO = open(p, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as e:
            raise _os_error(p, e) from None
    else:
        f, name = src, name or "<stream>"
    try:
        with f:
            with _OPEN_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im: Image.Image = Image.open(f, formats=formats)
            try:
                w, h = im.size
                check_size(w, h, name)
                if min_side and im.format == "JPEG" and w * h > DRAFT_PIXELS:
                    k = max(1, min(w, h) // (DRAFT_MARGIN * min_side))
                    im.draft(None, (w // k, h // k))
                need = decode_bytes(im.width, im.height, im.mode, "transparency" in im.info)
                if need > MAX_DECODE_BYTES:
                    raise ImageDecodeError(
                        f"{name}: image too large to decode within the memory bound ({w}x{h} "
                        f"{im.mode}: {need / 2**20:.0f} MiB, limit {MAX_DECODE_BYTES / 2**20:.0f} "
                        "MiB)"
                    )
                if hold is not None and w * h > DISPLAY_MAX_PIXELS:
                    hold.enter_context(_LARGE_DECODE)
                    _release_heap(hold)
                im.load()
                orientation = im.getexif().get(0x0112, 1)
            except BaseException:
                im.close()
                raise
            if orientation in (2, 3, 4, 5, 6, 7, 8):
                up = ImageOps.exif_transpose(im)
                im.close()
                im = up
                if orientation >= 5:  # a quarter turn: the upright size is swapped
                    w, h = h, w
            return im, (w, h)
    except InputError:
        raise
    except UnidentifiedImageError:
        what = f"a {', '.join(formats)} image" if formats else "an image Pillow can read"
        raise ImageDecodeError(f"{name}: not {what}") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{name}: image too large ({e})") from None
    except PermissionError as e:
        raise InputError(f"{name}: permission denied ({e.strerror or e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({e})") from None


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file (EXIF-upright); every failure names the file."""
    return _decode(path)[0]


def decode_image(
    src: str | Path | BinaryIO, name: str, formats: tuple[str, ...] | None = None
) -> Image.Image:
    """Fully decode an image from a path or binary stream with the same bounds as files.

    ``formats``: Pillow format names to accept (the content is sniffed, never a file name or
    a declared type); others are refused. Every failure is a typed error naming ``name``.
    """
    return _decode(src, name, formats=formats)[0]


def _gray_float(im: Image.Image, source: str) -> Image.Image:
    """16-bit / 32-bit / float single-channel image -> mode "F" in [0, 255], in row chunks.

    16-bit data keeps its precision (scaled by 255/65535); 32-bit integers above 255 are taken
    as 16-bit; float images are taken as 0-255 and clipped. Non-finite pixels are refused: they
    would reach the matcher as NaN distances.
    """
    w, h = im.size
    step = max(1, _ROWS_PIXELS // max(w, 1))
    lo, hi = math.inf, -math.inf
    for y in range(0, h, step):
        a = np.asarray(im.crop((0, y, w, min(h, y + step))))
        lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))  # NaN propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"{source}: image holds non-finite values (NaN or infinity)")
    mode = im.mode
    scale = 255.0 / 65535.0 if mode.startswith("I;16") or (mode == "I" and hi > 255) else 1.0
    if mode == "F" and lo >= 0 and hi <= 255:
        return im
    out = Image.new("F", (w, h))
    for y in range(0, h, step):
        box = (0, y, w, min(h, y + step))
        a = np.asarray(im.crop(box), dtype=np.float32) * np.float32(scale)
        out.paste(Image.fromarray(np.clip(a, 0, 255), mode="F"), box)
    return out


def _model_modes(im: Image.Image) -> Image.Image:
    """8-bit image -> "L" (single-channel sources) or "RGB"; alpha dropped, palettes expanded."""
    if im.mode in ("1", "L", "LA", "La"):
        return im if im.mode == "L" else im.convert("L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


def preprocess(
    im: Image.Image,
    contract: Contract,
    source: str = "<image>",
    original_size: tuple[int, int] | None = None,
    release: bool = False,
) -> Prepared:
    """Contract preprocessing of a decoded PIL image.

    Single-channel images are resized once and replicated to three channels (bitwise what
    resizing the RGB conversion gives); 16-bit and float images keep their precision.
    ``original_size``: the size before a draft-mode (reduced) JPEG decode. ``release``: close
    ``im`` (freeing its pixels) once its working copy exists: the caller is done with it.
    """
    w, h = original_size or im.size
    check_size(w, h, source)
    geo = crop_geometry(w, h, contract)
    if im.width < geo.display_size[0]:  # a draft-decoded JPEG: never upsample it for display
        geo = replace(geo, display_width=im.width, display_height=im.height)
    rw, rh = geo.resized_width, geo.resized_height
    if rw * rh > MAX_RESIZED_PIXELS:
        raise InputError(f"{source}: resized image {rw}x{rh} exceeds {MAX_RESIZED_PIXELS} pixels")
    work = _working_image(im, source)
    if release and work is not im:
        im.close()  # the decoded original and its converted copy are never both kept longer
    resized = work if work.size == (rw, rh) else work.resize((rw, rh), Image.Resampling.BILINEAR)
    s, top, left = geo.size, geo.top, geo.left
    crop = np.asarray(resized)[top : top + s, left : left + s]  # cropped first, then converted
    # (x/255 - mean) / std as one multiply-add per channel, written straight into CHW layout
    x = np.empty((3, s, s), dtype=np.float32)
    for c in range(3):
        scale = 1.0 / (255.0 * contract.std[c])
        chan = crop if crop.ndim == 2 else crop[:, :, c]  # single-channel: replicated
        np.multiply(chan, np.float32(scale), out=x[c], casting="unsafe")
        x[c] -= np.float32(contract.mean[c] / contract.std[c])
    return Prepared(x, geo, _display_rgb(work, geo), source)


def _working_image(im: Image.Image, source: str) -> Image.Image:
    """The image the model path resizes: "L", "RGB" or (16-bit, 32-bit, float sources) "F"."""
    try:
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            return _gray_float(im, source)
        return _model_modes(im)
    except (OSError, ValueError) as e:  # lazily loaded PIL images, exotic modes
        raise ImageDecodeError(f"{source}: cannot read image of mode {im.mode} ({e})") from None


def display_rgb(im: Image.Image, geo: Geometry, source: str = "<image>") -> np.ndarray:
    """The overlay copy of a decoded (upright) image: uint8 HxWx3 at ``geo.display_size``,
    exactly what ``Prepared.rgb`` holds (for re-rendering an overlay later, as serve does)."""
    return _display_rgb(_working_image(im, source), geo)


def _display_rgb(work: Image.Image, geo: Geometry) -> np.ndarray:
    """uint8 HxWx3 copy of the upright original for overlays, at ``geo.display_size``."""
    dw, dh = geo.display_size
    if work.size != (dw, dh):
        work = work.resize((dw, dh), Image.Resampling.BILINEAR)
    a = np.asarray(work)
    if a.dtype != np.uint8:  # mode "F": 0-255 floats
        a = np.round(a).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return a


def prepare_path(path: str | Path, contract: Contract) -> Prepared:
    """Decode + preprocess one file (large JPEGs decoded at a reduced scale, see DRAFT_PIXELS)."""
    with contextlib.ExitStack() as hold:
        im, size = _decode(path, min_side=contract.resize, hold=hold)
        with im:
            return preprocess(im, contract, str(path), original_size=size, release=True)


def prepare_bytes(
    data: bytes, contract: Contract, source: str, formats: tuple[str, ...] | None = None
) -> Prepared:
    """Decode + preprocess an image held in memory (an HTTP body), with the file path's bounds."""
    with contextlib.ExitStack() as hold:
        im, size = _decode(
            io.BytesIO(data), source, min_side=contract.resize, formats=formats, hold=hold
        )
        with im:
            return preprocess(im, contract, source, original_size=size, release=True)


#: What a white pixel is for each integer array type when the caller does not say.
_INT_WHITE = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}


def prepare_array(
    a: np.ndarray, contract: Contract, source: str = "<array>", white: float | None = None
) -> Prepared:
    """Preprocess a NumPy image with an explicit value convention (docs/reliability.md).

    Shapes: HxW (grayscale), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA, alpha dropped).
    Values: ``white`` is the value of a white pixel and every value must lie in [0, white].
    Defaults: uint8 255, uint16 65535, float 1.0; other integer types (int16, int32, ...) need
    ``white``; bool is refused. Out-of-range or non-finite values are refused, never clipped
    or guessed from the data.
    """
    if a.ndim == 3 and a.shape[2] in (1, 4):
        a = a[:, :, 0] if a.shape[2] == 1 else a[:, :, :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise InputError(
            f"{source}: array of shape {a.shape} is not an image (HxW, HxWx1, HxWx3 or HxWx4)"
        )
    check_size(a.shape[1], a.shape[0], source)
    dt = a.dtype
    if dt == np.bool_ or not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
        raise InputError(
            f"{source}: unsupported array dtype {dt} (use uint8 0-255, uint16 0-65535 or "
            "float in [0, 1])"
        )
    if white is None:
        if np.issubdtype(dt, np.floating):
            white = 1.0
        elif dt in _INT_WHITE:
            white = _INT_WHITE[dt]
        else:
            raise InputError(
                f"{source}: {dt} arrays need an explicit white level (white=...), e.g. 4095 "
                "for 12-bit data"
            )
    if not (math.isfinite(white) and white > 0):
        raise InputError(f"{source}: white level must be a positive number, got {white}")
    lo, hi = float(a.min()), float(a.max())  # NaN propagates through min/max
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"{source}: array holds non-finite values (NaN or infinity)")
    if lo < 0 or hi > white:
        raise InputError(
            f"{source}: {dt} array values span [{lo:g}, {hi:g}], outside [0, {white:g}]: pass "
            "white= for another range (values are never guessed or clipped)"
        )
    if dt == np.uint8 and white == 255:
        return preprocess(Image.fromarray(np.ascontiguousarray(a)), contract, source)
    f = a.astype(np.float32) * np.float32(255.0 / white)
    if f.ndim == 2:
        return preprocess(Image.fromarray(f, mode="F"), contract, source)
    u8 = np.round(f).astype(np.uint8)  # colour float data: 8 bits per channel, as before
    return preprocess(Image.fromarray(u8), contract, source)


def prepare_any(
    image: Any, contract: Contract, source: str = "<array>", white: float | None = None
) -> Prepared:
    """Accept a path, a PIL image or a NumPy array (see ``prepare_array`` for the values)."""
    if isinstance(image, (str, Path)):
        return prepare_path(image, contract)
    if isinstance(image, Image.Image):
        if white is not None:
            raise InputError(f"{source}: white= applies to NumPy arrays only")
        check_size(image.width, image.height, source)
        return preprocess(ImageOps.exif_transpose(image) or image, contract, source)
    if isinstance(image, np.ndarray):
        return prepare_array(image, contract, source, white)
    raise InputError(f"{source}: unsupported image type {type(image).__name__}")


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into image files; errors name the path.

    Files named directly and files found in folders obey the same ``IMAGE_SUFFIXES``.
    """
    exts = ", ".join(sorted(IMAGE_SUFFIXES))
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise InputError(f"{p}: folder contains no images ({exts})")
            out.extend(found)
        elif p.exists():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise InputError(f"{p}: not a supported image type ({exts})")
            out.append(p)
        else:  # missing, a dangling link or a loop: say which
            try:
                os.stat(p)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise _os_error(p, e) from None
            raise InputError(f"{p}: no such file or folder")
    return out


T = TypeVar("T")
R = TypeVar("R")


def read_ahead(
    items: Iterable[T], work: Callable[[T], R], pool: Executor, window: int
) -> Generator[tuple[T, Future[R]], None, None]:
    """Submit ``work(item)`` to ``pool`` at most ``window`` items ahead; yield in order.

    The one decode-ahead window (Detector and packer): memory stays bounded by ``window``
    prepared images however long the list is. Futures not yet yielded are cancelled when the
    consumer stops early.
    """
    queue: deque[tuple[T, Future[R]]] = deque()
    pending = iter(items)
    window = max(1, window)

    def refill() -> None:
        while len(queue) < window:
            try:
                nxt = next(pending)
            except StopIteration:
                return
            queue.append((nxt, pool.submit(work, nxt)))

    try:
        refill()
        while queue:
            item = queue.popleft()
            refill()
            yield item
    finally:
        for _, fut in queue:
            fut.cancel()
