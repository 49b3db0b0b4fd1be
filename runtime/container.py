"""A small, paranoid binary container shared by the gallery file and the TensorRT engine file.

Why a custom container: galleries are hundreds of MB of fp16 arrays that must open in
milliseconds (mmap, no parsing of the payload) and must never be trusted blindly (files get
truncated by full disks, bit-flipped by bad storage, or are simply the wrong file). So the
layout is fixed-size header + JSON manifest + aligned raw blobs, and the reader validates every
header field, size and offset with Python integers against the real file size **before** it
maps a single blob. Every failure is a :class:`FormatError` naming the file and the field.

Layout (little-endian; byte-exact description in docs/format.md)::

    0   8   magic (e.g. b"SPADEGAL", b"SPADEENG")
    8   4   u32 format version (of the artifact kind)
    12  4   u32 flags (must be 0)
    16  8   u64 manifest length L in bytes
    24  32  SHA-256 of the manifest bytes
    56  L   manifest: UTF-8 JSON {"alignment": A, "blobs": [...], "manifest": {...}}
    ..      zero padding up to the first multiple of A
    ..      blobs, each at a multiple of A, zero padding between, no bytes after the last
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.errors import FormatError, InputError
from spade_edge.runtime.fileio import atomic_path, is_sha256_hex

HEADER = struct.Struct("<8sIIQ32s")
HEADER_SIZE = HEADER.size  # 56
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_BLOBS = 256
MAX_DIM = 1 << 31
MAX_NDIM = 8
MAX_NAME_LEN = 255
MIN_ALIGNMENT = 8
MAX_ALIGNMENT = 1 << 24
DEFAULT_ALIGNMENT = 4096
#: Bytes hashed per step by ``verify`` (bounded memory, stays in cache for the ``check`` hook).
_VERIFY_CHUNK = 16 << 20
_VERIFY_THREADS = 4
#: dtypes a blob may have (numpy ``dtype.str``; always explicit little-endian or byte-sized).
ALLOWED_DTYPES = frozenset(
    {"|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8"}
)
_BLOB_KEYS = frozenset({"name", "dtype", "shape", "offset", "nbytes", "sha256"})
_TOP_KEYS = frozenset({"alignment", "blobs", "manifest"})
#: Pass as ``supported_versions`` to read any version (generic inspection only).
ANY_VERSION = range(0, 1 << 32)
_Versions = set[int] | frozenset[int] | range

GALLERY_MAGIC = b"SPADEGAL"
ENGINE_MAGIC = b"SPADEENG"
#: magic -> human name of the artifact kind (for error messages and spade-inspect).
KNOWN_MAGICS: dict[bytes, str] = {
    GALLERY_MAGIC: "spade-edge gallery",
    ENGINE_MAGIC: "spade-edge TensorRT engine",
}


@dataclass(frozen=True)
class BlobInfo:
    """Where one blob lives in the file and what it holds."""

    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    sha256: str


@dataclass(frozen=True)
class Layout:
    """What the header and manifest of a container say, after validation."""

    version: int
    manifest: dict[str, Any]
    blob_info: dict[str, BlobInfo]
    alignment: int
    file_size: int
    manifest_sha256: str


def peek_magic(path: str | Path) -> bytes:
    """First 8 bytes of a file (fewer if it is shorter): lets callers pick the artifact kind."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return f.read(8)
    except OSError as e:
        raise InputError(f"{p}: cannot read file: {e.strerror or e}") from None


def describe_foreign(head: bytes) -> str:
    """Best guess at what a file is from its first bytes, for 'wrong file' messages."""
    if head[:8] in KNOWN_MAGICS:
        return f"is a {KNOWN_MAGICS[head[:8]]}"
    guesses = [
        (b"\x89PNG", "is a PNG image"),
        (b"\xff\xd8\xff", "is a JPEG image"),
        (b"\x93NUMPY", "is a NumPy .npy file"),
        (b"PK\x03\x04", "is a zip archive (PyTorch checkpoint / .npz?)"),
        (b"\x80", "is a Python pickle (never loaded by spade-edge)"),
        (b"{", "is a JSON/text file"),
    ]
    for prefix, text in guesses:
        if head.startswith(prefix):
            return text
    if head[:1] == b"\x08" and len(head) > 1 and head[1] < 0x20:
        # ONNX ModelProto starts with field 1 (ir_version, varint): tag byte 0x08.
        return "is an ONNX model? (protobuf)"
    if not head:
        return "is empty"
    return "is not a spade-edge artifact"


# ----------------------------------------------------------------------------------- writing


def _align_up(x: int, a: int) -> int:
    return -(-x // a) * a


def _as_blob(name: str, value: np.ndarray | bytes | bytearray | memoryview, path: Path) -> Any:
    """Contiguous little-endian array view of a blob value (bytes become uint8 1-D)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(bytes(value) if isinstance(value, memoryview) else value, np.uint8)
    elif isinstance(value, np.ndarray):
        arr = value
    else:
        raise FormatError(
            f"{path}: blob {name!r} must be a NumPy array or bytes, got {type(value).__name__}"
        )
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype.str not in ALLOWED_DTYPES:
        raise FormatError(f"{path}: blob {name!r} has dtype {arr.dtype} which cannot be stored")
    if arr.ndim > MAX_NDIM or any(d > MAX_DIM for d in arr.shape):
        raise FormatError(f"{path}: blob {name!r} shape {arr.shape} exceeds the format's caps")
    # (not np.ascontiguousarray: it turns 0-d arrays into 1-d ones)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _encode_manifest(table: dict[str, Any], path: Path) -> bytes:
    try:
        text = json.dumps(table, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{path}: manifest is not JSON-serialisable: {e}") from None
    return text.encode("utf-8")


def write_container(
    path: str | Path,
    magic: bytes,
    version: int,
    manifest: dict[str, Any],
    blobs: Mapping[str, np.ndarray | bytes],
    alignment: int = DEFAULT_ALIGNMENT,
) -> None:
    """Write a container atomically: temp file in the same folder, fsync, ``os.replace``.

    On any exception (including KeyboardInterrupt) the temp file is removed and ``path`` is
    left as it was, so a reader never sees a half-written artifact. Output is deterministic
    for identical inputs (sorted JSON keys, blobs in the given order, zero padding).
    """
    path = Path(path)
    if not isinstance(magic, bytes) or len(magic) != 8:
        raise FormatError(f"{path}: container magic must be 8 bytes, got {magic!r}")
    if not isinstance(version, int) or not 0 <= version < 1 << 32:
        raise FormatError(f"{path}: container version must be a u32, got {version!r}")
    if (
        not isinstance(alignment, int)
        or alignment < MIN_ALIGNMENT
        or alignment > MAX_ALIGNMENT
        or alignment & (alignment - 1)
    ):
        raise FormatError(f"{path}: alignment {alignment!r} must be a power of two in [8, 2^24]")
    if len(blobs) > MAX_BLOBS:
        raise FormatError(f"{path}: {len(blobs)} blobs exceed the cap of {MAX_BLOBS}")
    arrays: list[tuple[str, Any]] = []
    for name, value in blobs.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
            raise FormatError(f"{path}: invalid blob name {name!r}")
        arrays.append((name, _as_blob(name, value, path)))
    entries = [
        {
            "name": name,
            "dtype": arr.dtype.str,
            "shape": [int(d) for d in arr.shape],
            "nbytes": int(arr.nbytes),
            "sha256": hashlib.sha256(memoryview(arr).cast("B")).hexdigest()
            if arr.nbytes
            else hashlib.sha256(b"").hexdigest(),
            "offset": 0,
        }
        for name, arr in arrays
    ]

    # Offsets live in the manifest, so its length depends on them: iterate to a fixed point
    # (converges in a few rounds because offsets only grow by whole alignments).
    data_start = _align_up(HEADER_SIZE, alignment)
    for _ in range(16):
        cursor = data_start
        for e in entries:
            e["offset"] = _align_up(cursor, alignment)
            cursor = e["offset"] + e["nbytes"]
        table = {"alignment": alignment, "blobs": entries, "manifest": manifest}
        mbytes = _encode_manifest(table, path)
        new_start = _align_up(HEADER_SIZE + len(mbytes), alignment)
        if new_start == data_start:
            break
        data_start = new_start
    else:  # pragma: no cover - cannot happen, offsets are monotone
        raise FormatError(f"{path}: could not lay out the container")
    if len(mbytes) > MAX_MANIFEST_BYTES:
        raise FormatError(f"{path}: manifest is {len(mbytes)} bytes, over the 16 MiB cap")

    header = HEADER.pack(magic, version, 0, len(mbytes), hashlib.sha256(mbytes).digest())
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(header)
        f.write(mbytes)
        pos = HEADER_SIZE + len(mbytes)
        for e, (_, arr) in zip(entries, arrays, strict=True):
            f.write(b"\0" * (e["offset"] - pos))
            if arr.nbytes:
                f.write(memoryview(arr).cast("B"))
            pos = e["offset"] + e["nbytes"]
        if pos < data_start:  # no blobs: still pad the manifest to the alignment
            f.write(b"\0" * (data_start - pos))
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------- reading


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Container:
    """A validated, memory-mapped container. Use :func:`read_container` to open one."""

    def __init__(self, path: Path, magic: bytes, layout: Layout, mm: mmap.mmap | None) -> None:
        self.path = path
        self.magic = magic
        self.layout = layout
        self.version = layout.version
        self.manifest = layout.manifest
        self.blob_info = layout.blob_info
        self.alignment = layout.alignment
        self.file_size = layout.file_size
        self.manifest_sha256 = layout.manifest_sha256
        self._mm = mm

    def blob(self, name: str) -> np.ndarray:
        """Read-only memory-mapped view of blob ``name`` with its stored dtype and shape."""
        info = self.blob_info.get(name)
        if info is None:
            raise FormatError(f"{self.path}: no blob named {name!r} in the container")
        dtype = np.dtype(info.dtype)
        if info.nbytes == 0:
            a = np.zeros(info.shape, dtype)
            a.flags.writeable = False
            return a
        if self._mm is None:
            raise FormatError(f"{self.path}: container is closed")
        count = info.nbytes // dtype.itemsize
        return np.frombuffer(self._mm, dtype, count=count, offset=info.offset).reshape(info.shape)

    def verify(self, check: Callable[[str, memoryview], None] | None = None) -> None:
        """Check every blob's SHA-256 (reads the whole file; open itself does not).

        ``check(name, chunk)`` also sees every chunk of every blob on the same pass (the
        gallery checks finiteness there). Blobs are hashed on a few threads (hashlib and NumPy
        release the GIL); the first mismatch in blob-table order is reported.
        """
        if self._mm is None and any(bi.nbytes for bi in self.blob_info.values()):
            raise FormatError(f"{self.path}: container is closed")
        items = sorted(self.blob_info.items(), key=lambda kv: -kv[1].nbytes)
        workers = max(1, min(_VERIFY_THREADS, len(items), os.cpu_count() or 1))
        if workers == 1:
            digests = {name: self._blob_sha256(name, bi, check) for name, bi in items}
        else:
            with ThreadPoolExecutor(workers) as pool:
                futs = {name: pool.submit(self._blob_sha256, name, bi, check) for name, bi in items}
                digests = {name: f.result() for name, f in futs.items()}
        for name, info in self.blob_info.items():
            if digests[name] != info.sha256:
                raise FormatError(
                    f"{self.path}: blob {name!r} is corrupt (SHA-256 mismatch; "
                    f"stored {info.sha256[:16]}…, computed {digests[name][:16]}…)"
                )

    def _blob_sha256(
        self, name: str, info: BlobInfo, check: Callable[[str, memoryview], None] | None
    ) -> str:
        h = hashlib.sha256()
        if not info.nbytes:
            return h.hexdigest()
        assert self._mm is not None
        view = memoryview(self._mm)
        try:
            for start in range(info.offset, info.offset + info.nbytes, _VERIFY_CHUNK):
                chunk = view[start : min(start + _VERIFY_CHUNK, info.offset + info.nbytes)]
                h.update(chunk)
                if check is not None:
                    check(name, chunk)
                chunk.release()
        finally:
            view.release()
        return h.hexdigest()

    def close(self) -> None:
        """Unmap the file. Arrays handed out earlier keep the mapping alive until freed."""
        mm, self._mm = self._mm, None
        if mm is not None:
            with contextlib.suppress(BufferError):
                mm.close()

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_container(
    path: str | Path,
    magic: bytes,
    supported_versions: Iterable[int],
    verify: bool = False,
) -> Container:
    """Open and validate a container; every problem is a FormatError naming file and field.

    ``supported_versions``: a set/tuple of format versions this caller understands (a
    ``range`` works too: ``ANY_VERSION`` lets generic tools such as spade-inspect read any).
    """
    p = Path(path)
    try:
        f = p.open("rb")
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except OSError as e:
        raise InputError(f"{p}: cannot read file: {e.strerror or e}") from None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER_SIZE)
        except OSError as e:
            raise InputError(f"{p}: cannot read file: {e.strerror or e}") from None
        versions = (
            supported_versions
            if isinstance(supported_versions, (set, frozenset, range))
            else frozenset(supported_versions)
        )
        info = _parse(p, f, size, head, magic, versions)
        mm = None
        if size:
            try:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise InputError(f"{p}: cannot memory-map file: {e}") from None
    c = Container(p, magic, info, mm=mm)
    if verify:
        c.verify()
    return c


def _parse_header(
    p: Path, size: int, head: bytes, magic: bytes, versions: _Versions
) -> tuple[int, int, bytes]:
    """Magic, version, flags and manifest length of the fixed header: (version, mlen, sha)."""
    kind = KNOWN_MAGICS.get(magic, f"{magic!r}")
    if head[: len(magic)] != magic:
        if len(head) < len(magic) and magic.startswith(head) and head:
            raise FormatError(f"{p}: truncated header ({size} bytes; magic incomplete)")
        raise FormatError(
            f"{p}: not a {kind} file (magic {head[:8]!r}); it {describe_foreign(head)}"
        )
    if len(head) < HEADER_SIZE:
        raise FormatError(f"{p}: truncated header ({size} bytes, need {HEADER_SIZE})")
    _, version, flags, mlen, msha = HEADER.unpack(head)
    if version not in versions:
        want = (
            f"{versions.start}..{versions.stop - 1}"
            if isinstance(versions, range)
            else ", ".join(str(v) for v in sorted(versions))
        )
        raise FormatError(
            f"{p}: {kind} format version {version} is not supported (this build reads: {want})"
        )
    if flags != 0:
        raise FormatError(f"{p}: header field 'flags' is {flags:#x}, must be 0")
    if mlen < 2 or mlen > MAX_MANIFEST_BYTES:
        raise FormatError(f"{p}: header field 'manifest length' is {mlen} (allowed 2..16 MiB)")
    if HEADER_SIZE + mlen > size:
        raise FormatError(
            f"{p}: truncated manifest (needs {HEADER_SIZE + mlen} bytes, file has {size})"
        )
    return version, mlen, msha


def _read_table(p: Path, f: Any, mlen: int, msha: bytes) -> dict[str, Any]:
    """The manifest bytes, checked against the header's SHA-256, as strict JSON."""
    mbytes = f.read(mlen)
    if len(mbytes) != mlen:
        raise FormatError(f"{p}: truncated manifest (file shrank while reading)")
    if hashlib.sha256(mbytes).digest() != msha:
        raise FormatError(f"{p}: manifest is corrupt (SHA-256 mismatch with the header)")
    try:
        table = json.loads(
            mbytes.decode("utf-8"),
            parse_constant=_reject_constant,
            object_pairs_hook=_no_duplicates,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{p}: manifest is not valid UTF-8 JSON: {e}") from None
    if not isinstance(table, dict) or set(table) != _TOP_KEYS:
        got = sorted(table) if isinstance(table, dict) else type(table).__name__
        raise FormatError(f"{p}: manifest must have exactly keys {sorted(_TOP_KEYS)}, got {got}")
    if not isinstance(table["manifest"], dict):
        raise FormatError(f"{p}: manifest field 'manifest' is not an object")
    return table


def _data_start(p: Path, f: Any, table: dict[str, Any], mlen: int, size: int) -> tuple[int, int]:
    """(alignment, offset of the first blob); the padding after the manifest must be zeros."""
    alignment = table["alignment"]
    if (
        not _is_int(alignment)
        or not MIN_ALIGNMENT <= alignment <= MAX_ALIGNMENT
        or alignment & (alignment - 1)
    ):
        raise FormatError(f"{p}: manifest field 'alignment' is {alignment!r}")
    data_start = _align_up(HEADER_SIZE + mlen, alignment)
    if data_start > size:
        raise FormatError(f"{p}: truncated after the manifest (padding to byte {data_start})")
    pad = f.read(data_start - HEADER_SIZE - mlen)
    if pad.count(0) != len(pad):
        raise FormatError(f"{p}: non-zero bytes in the padding after the manifest")
    return alignment, data_start


def _blob_table(
    p: Path, table: dict[str, Any], alignment: int, data_start: int, size: int
) -> dict[str, BlobInfo]:
    blobs = table["blobs"]
    if not isinstance(blobs, list):
        raise FormatError(f"{p}: manifest field 'blobs' is not a list")
    if len(blobs) > MAX_BLOBS:
        raise FormatError(f"{p}: manifest field 'blobs' has {len(blobs)} entries (cap {MAX_BLOBS})")
    infos: dict[str, BlobInfo] = {}
    for i, e in enumerate(blobs):
        name, bi = _parse_blob(p, i, e, alignment, data_start, size)
        if name in infos:
            raise FormatError(f"{p}: blob name {name!r} appears twice in the blob table")
        infos[name] = bi
    return infos


def _check_tiling(
    p: Path, f: Any, infos: dict[str, BlobInfo], alignment: int, data_start: int, size: int
) -> None:
    """Blobs tile the data region: no overlap, zero padding (< alignment) between them, and
    the last one ends exactly at the end of the file."""
    ordered = sorted(infos.items(), key=lambda kv: (kv[1].offset, kv[1].nbytes))
    end = data_start
    for name, bi in ordered:
        if bi.offset < end:
            raise FormatError(f"{p}: blob {name!r} at offset {bi.offset} overlaps the previous")
        end = bi.offset + bi.nbytes
    if end != size:
        what = "truncated" if size < end else "trailing bytes after the last blob"
        raise FormatError(f"{p}: {what} (file has {size} bytes, blob table says {end})")
    pos = data_start
    for name, bi in ordered:  # cheap: each gap is < alignment
        if bi.offset - pos >= alignment:
            raise FormatError(f"{p}: blob {name!r} offset {bi.offset} leaves an unexplained gap")
        if bi.offset > pos:
            f.seek(pos)
            gap = f.read(bi.offset - pos)
            if len(gap) != bi.offset - pos or gap.count(0) != len(gap):
                raise FormatError(f"{p}: non-zero padding before blob {name!r}")
        pos = bi.offset + bi.nbytes


def _parse(p: Path, f: Any, size: int, head: bytes, magic: bytes, versions: _Versions) -> Layout:
    """Validate header, manifest and blob table against the real file size (no blob is read)."""
    version, mlen, msha = _parse_header(p, size, head, magic, versions)
    table = _read_table(p, f, mlen, msha)
    alignment, data_start = _data_start(p, f, table, mlen, size)
    infos = _blob_table(p, table, alignment, data_start, size)
    _check_tiling(p, f, infos, alignment, data_start, size)
    return Layout(version, table["manifest"], infos, alignment, size, msha.hex())


def _parse_blob(
    p: Path, i: int, e: Any, alignment: int, data_start: int, size: int
) -> tuple[str, BlobInfo]:
    where = f"blob table entry {i}"
    if not isinstance(e, dict) or set(e) != _BLOB_KEYS:
        got = sorted(e) if isinstance(e, dict) else type(e).__name__
        raise FormatError(f"{p}: {where} must have keys {sorted(_BLOB_KEYS)}, got {got}")
    name = e["name"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
        raise FormatError(f"{p}: {where} field 'name' is invalid: {name!r:.80}")
    where = f"blob {name!r}"
    dtype = e["dtype"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise FormatError(f"{p}: {where} field 'dtype' {dtype!r:.40} is not allowed")
    shape = e["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)
    ):
        raise FormatError(f"{p}: {where} field 'shape' is invalid: {shape!r:.80}")
    nbytes, offset, sha = e["nbytes"], e["offset"], e["sha256"]
    itemsize = np.dtype(dtype).itemsize
    if not _is_int(nbytes) or nbytes != math.prod(shape) * itemsize:
        raise FormatError(f"{p}: {where} field 'nbytes' {nbytes!r:.40} does not match its shape")
    if not _is_int(offset) or offset < data_start or offset % alignment:
        raise FormatError(
            f"{p}: {where} field 'offset' {offset!r:.40} is not an aligned offset past the manifest"
        )
    if offset + nbytes > size:
        raise FormatError(
            f"{p}: truncated: {where} ends at byte {offset + nbytes}, file has {size} bytes"
        )
    if not is_sha256_hex(sha):
        raise FormatError(f"{p}: {where} field 'sha256' is not 64 lowercase hex digits")
    return name, BlobInfo(offset, nbytes, dtype, tuple(shape), sha)


__all__ = [
    "ALLOWED_DTYPES",
    "ANY_VERSION",
    "DEFAULT_ALIGNMENT",
    "ENGINE_MAGIC",
    "GALLERY_MAGIC",
    "HEADER_SIZE",
    "KNOWN_MAGICS",
    "BlobInfo",
    "Container",
    "Layout",
    "describe_foreign",
    "peek_magic",
    "read_container",
    "write_container",
]
