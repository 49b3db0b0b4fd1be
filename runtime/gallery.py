"""Gallery file format v1: the features of the normal images, packed for millisecond opening.

A gallery is a container (runtime/container.py) with magic ``b"SPADEGAL"``. Features are
stored fp16 (half the bytes of fp32; SPADE's kNN is insensitive to fp16 rounding) and
channels-last, exactly the layout the matchers consume, so opening is an mmap with no copy.
Squared norms are stored next to them, computed FROM THE fp16-ROUNDED values, so the
expanded distance ‖q‖² + ‖g‖² − 2 q·g is consistent with the stored vectors.

Source names and content hashes live in blobs (not in the JSON manifest) because the
manifest is capped at 16 MiB while a gallery may hold up to 10 million images. Names are stored
as the file system's bytes (a name that is not UTF-8 round-trips unchanged).

Anything that copies blobs out of an existing gallery into a new file (``rewrite_gallery``,
``append_gallery``) verifies them first: a corrupt gallery never comes out with fresh, valid
checksums. Verifying also proves every stored feature and norm is finite.
Byte-level description: docs/format.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ParamSpec

import numpy as np

from spade_edge.runtime import __version__
from spade_edge.runtime.container import (
    GALLERY_MAGIC,
    BlobInfo,
    Container,
    read_container,
    write_container,
)
from spade_edge.runtime.contract import Contract
from spade_edge.runtime.errors import FormatError, InputError
from spade_edge.runtime.fileio import is_sha256_hex, utc_timestamp

GALLERY_VERSION = 1
SUPPORTED_VERSIONS = frozenset({GALLERY_VERSION})
GALLERY_KIND = "spade-edge gallery"
MAX_IMAGES = 10_000_000
MAX_DEFAULT_K = 100_000
#: K stored when the writer is not told otherwise (``min(DEFAULT_K, n)`` for small galleries).
DEFAULT_K = 5
FEATURE_DTYPE = "<f2"
SQNORM_DTYPE = "<f4"
#: Images processed at a time when computing norms (bounds the temporary float64 copy).
_NORM_CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32: stays in cache

_MANIFEST_KEYS = frozenset(
    {
        "kind",
        "format_version",
        "tool_version",
        "model_fingerprint",
        "contract",
        "n_images",
        "pooled_dim",
        "levels",
        "dtypes",
        "sources",
        "created",
        "default_k",
        "thresholds",
        "extra",
    }
)
_LEVEL_KEYS = frozenset({"name", "stride", "height", "width", "channels", "blob", "sqnorms_blob"})
_SOURCES_VALUE = {"names_blob": "source_names", "sha256_blob": "source_sha256"}


class _Keep:
    """Sentinel: 'leave this manifest field as it is' in :func:`rewrite_gallery`."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()


# ----------------------------------------------------------------------------------- helpers


def bytes_per_image(contract: Contract) -> int:
    """Payload bytes one image adds to a gallery (fp16 features + fp32 norms + its hash).

    Names are variable-length and excluded. wrn50 at 224 gives 2,830,452 bytes (≈ 2.83 MB).
    """
    n = 2 * contract.pooled_dim + 4 + 32
    for lv in contract.levels:
        n += lv.height * lv.width * (2 * lv.channels + 4)
    return n


def _level_entry(i: int, lv: Any) -> dict[str, Any]:
    """A level's manifest entry: written by the writer, required verbatim by the reader."""
    return {
        "name": lv.name,
        "stride": lv.stride,
        "height": lv.height,
        "width": lv.width,
        "channels": lv.channels,
        "blob": f"level{i}",
        "sqnorms_blob": f"level{i}_sqnorms",
    }


def sqnorms_fp16(a: np.ndarray) -> np.ndarray:
    """Squared L2 norms over the last axis of fp16 values, as float32.

    Each product of two fp16 values is exact in float32 (22 significant bits); the sum uses
    NumPy's pairwise reduction over the contiguous channel axis (fixed order, so galleries are
    byte-reproducible). Rows go through one small reused buffer: fresh 100 MB temporaries
    cost more in page faults than the arithmetic (measured 4x).
    """
    h = np.asarray(a, dtype=np.float16)
    if h.ndim < 2:
        raise ValueError("sqnorms_fp16 wants [N, ..., C] features")
    c = h.shape[-1]
    rows = h.reshape(-1, c)
    out = np.empty(rows.shape[0], np.float32)
    step = max(1, _NORM_CHUNK_ELEMENTS // max(c, 1))
    buf = np.empty((min(step, len(rows)), c), np.float32)
    for s in range(0, len(rows), step):
        x = buf[: len(rows[s : s + step])]
        np.copyto(x, rows[s : s + step], casting="same_kind")
        np.square(x, out=x)
        np.add.reduce(x, axis=-1, out=out[s : s + step])
    return out.reshape(h.shape[:-1])


def _to_fp16(a: np.ndarray, what: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """fp16 copy of features and their squared norms; refuses NaN/inf and values fp16 cannot
    hold (scores would be NaN). Any non-finite element makes its row's norm non-finite, so
    checking the norms checks every element without a second pass over the features."""
    arr = np.asarray(a)
    if arr.dtype == np.float16:
        h = np.ascontiguousarray(arr)
    else:
        if not np.issubdtype(arr.dtype, np.floating):
            raise InputError(f"{path}: {what} features must be floating point, got {arr.dtype}")
        with np.errstate(over="ignore"):  # overflow becomes inf, refused just below
            h = np.ascontiguousarray(arr.astype(np.float16))
    with np.errstate(invalid="ignore", over="ignore"):
        norms = sqnorms_fp16(h)
    if not np.isfinite(norms).all():
        raise InputError(
            f"{path}: {what} features contain NaN/inf or values beyond fp16 range (±65504)"
        )
    return h, norms


def encode_name(name: str) -> bytes:
    """A source name as stored: the file system's bytes (``os.fsencode``'s surrogateescape),
    so a name that is not UTF-8 survives the round trip unchanged."""
    return name.encode("utf-8", "surrogateescape")


def check_source_name(name: Any, where: str) -> str:
    """A storable source name (non-empty, no line break, encodable), else InputError."""
    if not isinstance(name, str) or not name or "\n" in name or "\r" in name:
        raise InputError(f"{where}: source name {name!r} is empty or has a line break")
    try:
        encode_name(name)
    except UnicodeEncodeError:
        raise InputError(f"{where}: source name {name!r} cannot be stored as bytes") from None
    return name


def _check_sources(sources: Sequence[dict[str, Any]], n: int, path: Path) -> list[dict[str, str]]:
    if len(sources) != n:
        raise InputError(f"{path}: {len(sources)} sources given for {n} images")
    out = []
    seen: dict[str, str] = {}
    for i, s in enumerate(sources):
        if not isinstance(s, dict):
            raise InputError(f"{path}: source {i} must be a dict with 'name' and 'sha256'")
        name = check_source_name(s.get("name"), f"{path}: source {i}")
        sha = s.get("sha256")
        if not is_sha256_hex(sha):
            raise InputError(f"{path}: source {name!r} sha256 is not 64 lowercase hex digits")
        assert isinstance(sha, str)
        if sha in seen:
            raise InputError(
                f"{path}: {name!r} has the same content as {seen[sha]!r} (SHA-256 {sha[:16]}…); "
                "an image packed twice biases the kNN"
            )
        seen[sha] = name
        out.append({"name": name, "sha256": sha})
    return out


def _check_default_k(default_k: int | None, n: int, path: Path) -> int:
    """``None`` -> ``min(DEFAULT_K, n)``, so a small gallery is usable with its defaults."""
    if default_k is None:
        return min(DEFAULT_K, n)
    if isinstance(default_k, bool) or not isinstance(default_k, int):
        raise InputError(f"{path}: default_k must be an integer, got {default_k!r}")
    if not 1 <= default_k <= MAX_DEFAULT_K:
        raise InputError(f"{path}: default_k {default_k} out of range 1..{MAX_DEFAULT_K}")
    return default_k


# ----------------------------------------------------------------------------------- writing


@dataclass
class GalleryData:
    """Everything a gallery file holds, in memory, checked: fp16 features with the float32
    norms of the fp16 values, sources, manifest fields. Satisfies the matchers'
    ``GalleryArrays``, so thresholds can be computed before the file is written."""

    contract: Contract
    fingerprint: str
    pooled: np.ndarray
    pooled_sqnorms: np.ndarray
    levels: list[np.ndarray]
    level_sqnorms: list[np.ndarray]
    sources: list[dict[str, str]]
    default_k: int
    created: str
    thresholds: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: str = "<new gallery>"

    @property
    def n_images(self) -> int:
        return len(self.pooled)

    def manifest(self) -> dict[str, Any]:
        return {
            "kind": GALLERY_KIND,
            "format_version": GALLERY_VERSION,
            "tool_version": __version__,
            "model_fingerprint": self.fingerprint,
            "contract": self.contract.to_dict(),
            "n_images": self.n_images,
            "pooled_dim": self.contract.pooled_dim,
            "levels": [_level_entry(i, lv) for i, lv in enumerate(self.contract.levels)],
            "dtypes": {"features": FEATURE_DTYPE, "sqnorms": SQNORM_DTYPE},
            "sources": dict(_SOURCES_VALUE),
            "created": self.created,
            "default_k": self.default_k,
            "thresholds": self.thresholds,
            "extra": self.extra,
        }

    def blobs(self) -> dict[str, np.ndarray | bytes]:
        names = b"\n".join(encode_name(s["name"]) for s in self.sources)
        hashes = np.frombuffer(b"".join(bytes.fromhex(s["sha256"]) for s in self.sources), np.uint8)
        out: dict[str, np.ndarray | bytes] = {
            "pooled": self.pooled,
            "pooled_sqnorms": self.pooled_sqnorms,
        }
        for i, (lv, sq) in enumerate(zip(self.levels, self.level_sqnorms, strict=True)):
            out[f"level{i}"] = lv
            out[f"level{i}_sqnorms"] = sq
        out["source_sha256"] = hashes.reshape(self.n_images, 32)
        out["source_names"] = names
        return out


def save_gallery(path: str | Path, data: GalleryData) -> None:
    """Write ``data`` to ``path`` atomically (the old file stays until the new one is whole)."""
    p = Path(path)
    if data.thresholds is not None and not isinstance(data.thresholds, dict):
        raise InputError(f"{p}: thresholds must be a dict or None")
    if not isinstance(data.extra, dict):
        raise InputError(f"{p}: extra must be a dict")
    write_container(p, GALLERY_MAGIC, GALLERY_VERSION, data.manifest(), data.blobs())


def _prepare_shapes(
    path: Path, contract: Contract, p: np.ndarray, levels: Sequence[np.ndarray]
) -> None:
    """Features must have the contract's shapes (channels-last) and a sane image count."""
    if p.ndim != 2 or p.shape[1] != contract.pooled_dim:
        raise InputError(
            f"{path}: pooled features have shape {p.shape}, "
            f"contract wants [N, {contract.pooled_dim}]"
        )
    n = p.shape[0]
    if not 1 <= n <= MAX_IMAGES:
        raise InputError(f"{path}: {n} images; a gallery holds 1..{MAX_IMAGES}")
    if len(levels) != len(contract.levels):
        raise InputError(
            f"{path}: {len(levels)} feature levels given, contract has {len(contract.levels)}"
        )
    for lv, a in zip(contract.levels, levels, strict=True):
        want = (n, lv.height, lv.width, lv.channels)
        if tuple(np.shape(a)) != want:
            raise InputError(
                f"{path}: level {lv.name!r} features have shape {tuple(np.shape(a))}, "
                f"contract wants {list(want)} (channels-last)"
            )


def _prepare_features(
    path: Path, contract: Contract, pooled: np.ndarray, levels: Sequence[np.ndarray]
) -> tuple[tuple[np.ndarray, np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Shape-check against the contract, round to fp16, compute norms: (fp16, sqnorms) pairs."""
    p = np.asarray(pooled)
    _prepare_shapes(path, contract, p, levels)
    out = [
        _to_fp16(a, f"level {lv.name!r}", path)
        for lv, a in zip(contract.levels, levels, strict=True)
    ]
    return _to_fp16(p, "pooled", path), out


def _given_norms(
    path: Path,
    contract: Contract,
    pooled: np.ndarray,
    levels: Sequence[np.ndarray],
    sqnorms: tuple[np.ndarray, list[np.ndarray]],
) -> tuple[tuple[np.ndarray, np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Pair fp16 features with norms computed by the caller, after the same checks."""
    arrays = [np.asarray(pooled), *(np.asarray(a) for a in levels)]
    norms = [np.asarray(sqnorms[0]), *(np.asarray(q) for q in sqnorms[1])]
    if len(norms) != len(arrays) or any(a.dtype != np.float16 for a in arrays):
        raise InputError(f"{path}: precomputed norms need fp16 features, one norm array each")
    _prepare_shapes(path, contract, arrays[0], arrays[1:])
    pairs = []
    for what, a, q in zip(
        ["pooled", *(lv.name for lv in contract.levels)], arrays, norms, strict=True
    ):
        if q.dtype != np.float32 or q.shape != a.shape[:-1]:
            raise InputError(f"{path}: norms of {what} have shape {q.shape}, want {a.shape[:-1]}")
        if not np.isfinite(q).all():
            raise InputError(
                f"{path}: {what} features contain NaN/inf or values beyond fp16 range (±65504)"
            )
        pairs.append((np.ascontiguousarray(a), np.ascontiguousarray(q)))
    return pairs[0], pairs[1:]


def prepare_gallery(
    path: str | Path,
    contract: Contract,
    fingerprint: str,
    pooled: np.ndarray,
    levels: Sequence[np.ndarray],
    sources: Sequence[dict[str, Any]],
    *,
    default_k: int | None = None,
    thresholds: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    created: str | None = None,
    sqnorms: tuple[np.ndarray, list[np.ndarray]] | None = None,
) -> GalleryData:
    """Check and round everything a gallery file holds, without writing it (``path`` names
    the destination in error messages); :func:`write_gallery` writes the result.

    ``sqnorms``: (pooled, per level) norms already computed with :func:`sqnorms_fp16` from
    exactly these fp16 features (the packer does it per batch, overlapped with inference);
    only accepted with fp16 features. They are still checked for shape and finiteness.

    ``sources``: one ``{"name": str, "sha256": hex}`` per image (content hash of the file);
    the same content twice is refused. ``default_k``: None stores ``min(5, n)``.
    ``created``: ISO-8601 UTC time, now when None (pass a fixed value for byte-reproducible
    files).
    """
    p = Path(path)
    if not is_sha256_hex(fingerprint):
        raise InputError(f"{p}: model fingerprint {fingerprint!r} is not 64 lowercase hex")
    if sqnorms is not None:
        (pooled16, pooled_sq), lv_pairs = _given_norms(p, contract, pooled, levels, sqnorms)
    else:
        (pooled16, pooled_sq), lv_pairs = _prepare_features(p, contract, pooled, levels)
    n = len(pooled16)
    if thresholds is not None and not isinstance(thresholds, dict):
        raise InputError(f"{p}: thresholds must be a dict or None")
    if extra is not None and not isinstance(extra, dict):
        raise InputError(f"{p}: extra must be a dict or None")
    return GalleryData(
        contract=contract,
        fingerprint=fingerprint,
        pooled=pooled16,
        pooled_sqnorms=pooled_sq,
        levels=[h for h, _ in lv_pairs],
        level_sqnorms=[sq for _, sq in lv_pairs],
        sources=_check_sources(sources, n, p),
        default_k=_check_default_k(default_k, n, p),
        created=created or utc_timestamp(),
        thresholds=thresholds,
        extra=extra or {},
        path=str(p),
    )


P = ParamSpec("P")


def _then_saved(prepare: Callable[P, GalleryData]) -> Callable[P, None]:
    """``prepare`` (checks and rounding), then an atomic save to the path its result names."""

    def write_gallery(*args: P.args, **kwargs: P.kwargs) -> None:
        data = prepare(*args, **kwargs)
        save_gallery(data.path, data)

    return write_gallery


#: Round features to fp16, compute their norms and write a v1 gallery atomically; the arguments
#: and checks are :func:`prepare_gallery`'s.
write_gallery = _then_saved(prepare_gallery)


# ----------------------------------------------------------------------------------- reading


def _fail(path: Path, field: str, what: str) -> FormatError:
    return FormatError(f"{path}: gallery field '{field}' {what}")


def _int_field(path: Path, m: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = m[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _fail(path, key, f"is {v!r:.40}, must be an integer in {lo}..{hi}")
    return v


def _short_string(path: Path, m: dict[str, Any], key: str) -> str:
    v = m[key]
    if not isinstance(v, str) or len(v) > 64:
        raise _fail(path, key, "is not a short string")
    return v


@dataclass(frozen=True)
class GalleryHeader:
    """The validated manifest fields of a gallery file."""

    fingerprint: str
    contract: Contract
    n_images: int
    default_k: int
    thresholds: dict[str, Any] | None
    extra: dict[str, Any]
    created: str
    tool_version: str


def _check_manifest_keys(p: Path, m: dict[str, Any], version: int) -> None:
    if set(m) != _MANIFEST_KEYS:
        missing = sorted(_MANIFEST_KEYS - set(m))
        unknown = sorted(set(m) - _MANIFEST_KEYS)
        raise FormatError(
            f"{p}: gallery manifest keys wrong (missing {missing}, unknown {unknown})"
        )
    if m["kind"] != GALLERY_KIND:
        raise _fail(p, "kind", f"is {m['kind']!r:.40}, expected {GALLERY_KIND!r}")
    if m["format_version"] != version or isinstance(m["format_version"], bool):
        raise _fail(p, "format_version", f"is {m['format_version']!r:.20}, header says {version}")


def _check_levels(p: Path, m: dict[str, Any], c: Contract) -> None:
    """``pooled_dim``, ``levels``, ``dtypes`` and ``sources`` must be what the writer writes."""
    if m["pooled_dim"] != c.pooled_dim or isinstance(m["pooled_dim"], bool):
        raise _fail(p, "pooled_dim", f"is {m['pooled_dim']!r:.20}, contract says {c.pooled_dim}")
    lvs = m["levels"]
    if not isinstance(lvs, list) or len(lvs) != len(c.levels):
        raise _fail(p, "levels", f"must list the contract's {len(c.levels)} levels")
    for i, (e, lv) in enumerate(zip(lvs, c.levels, strict=True)):
        if not isinstance(e, dict) or set(e) != _LEVEL_KEYS:
            raise _fail(p, f"levels[{i}]", f"must have keys {sorted(_LEVEL_KEYS)}")
        for k, v in _level_entry(i, lv).items():
            if e[k] != v or isinstance(e[k], bool):
                raise _fail(p, f"levels[{i}].{k}", f"is {e[k]!r:.40}, contract says {v!r}")
    if m["dtypes"] != {"features": FEATURE_DTYPE, "sqnorms": SQNORM_DTYPE}:
        raise _fail(p, "dtypes", f"is {m['dtypes']!r:.80}; v1 stores <f2 features, <f4 norms")
    if m["sources"] != _SOURCES_VALUE:
        raise _fail(p, "sources", f"is {m['sources']!r:.80}, expected {_SOURCES_VALUE}")


def read_header(p: Path, m: dict[str, Any], version: int) -> GalleryHeader:
    """Validate a gallery manifest (no blob data is read); every problem names the field."""
    _check_manifest_keys(p, m, version)
    tool_version = _short_string(p, m, "tool_version")
    fp = m["model_fingerprint"]
    if not is_sha256_hex(fp):
        raise _fail(p, "model_fingerprint", "is not 64 lowercase hex digits")
    contract = Contract.from_dict(m["contract"], f"{p} (gallery field 'contract')")
    n = _int_field(p, m, "n_images", 1, MAX_IMAGES)
    _check_levels(p, m, contract)
    created = _short_string(p, m, "created")
    default_k = _int_field(p, m, "default_k", 1, MAX_DEFAULT_K)
    if m["thresholds"] is not None and not isinstance(m["thresholds"], dict):
        raise _fail(p, "thresholds", "must be null or an object")
    if not isinstance(m["extra"], dict):
        raise _fail(p, "extra", "must be an object")
    return GalleryHeader(
        fingerprint=fp,
        contract=contract,
        n_images=n,
        default_k=default_k,
        thresholds=m["thresholds"],
        extra=m["extra"],
        created=created,
        tool_version=tool_version,
    )


def expected_blobs(contract: Contract, n: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Blob name -> (dtype, shape) of a gallery of ``n`` images (``source_names`` aside)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {
        "pooled": (FEATURE_DTYPE, (n, contract.pooled_dim)),
        "pooled_sqnorms": (SQNORM_DTYPE, (n,)),
        "source_sha256": ("|u1", (n, 32)),
    }
    for i, lv in enumerate(contract.levels):
        out[f"level{i}"] = (FEATURE_DTYPE, (n, lv.height, lv.width, lv.channels))
        out[f"level{i}_sqnorms"] = (SQNORM_DTYPE, (n, lv.height, lv.width))
    return out


def check_blob_layout(p: Path, header: GalleryHeader, info: dict[str, BlobInfo]) -> None:
    """The blob table must hold exactly the blobs the header implies, with their dtypes/shapes."""
    expected = expected_blobs(header.contract, header.n_images)
    want_names = set(expected) | {"source_names"}
    if set(info) != want_names:
        raise FormatError(
            f"{p}: gallery blobs wrong (missing {sorted(want_names - set(info))}, "
            f"unknown {sorted(set(info) - want_names)})"
        )
    for name, (dtype, shape) in expected.items():
        bi = info[name]
        if bi.dtype != dtype:
            raise FormatError(f"{p}: gallery blob {name!r} has dtype {bi.dtype}, need {dtype}")
        if bi.shape != shape:
            raise FormatError(
                f"{p}: gallery blob {name!r} has shape {list(bi.shape)}, need {list(shape)}"
            )
    names = info["source_names"]
    if names.dtype != "|u1" or len(names.shape) != 1:
        raise FormatError(f"{p}: gallery blob 'source_names' must be 1-D uint8 (name bytes)")


def _nonfinite_fp16(chunk: np.ndarray) -> bool:
    """Any NaN/inf among fp16 values (exponent bits all set), without float arithmetic."""
    u = chunk.view(np.uint16)
    return bool(u.size) and int(np.bitwise_and(u, 0x7FFF).max()) >= 0x7C00


def _nonfinite_fp32(chunk: np.ndarray) -> bool:
    u = chunk.view(np.uint32)
    return bool(u.size) and int(np.bitwise_and(u, 0x7FFFFFFF).max()) >= 0x7F800000


@dataclass
class InMemoryGallery:
    """``GalleryArrays`` held in memory, stored exactly like a packed gallery (fp16 features,
    fp32 squared norms of the fp16 values): for leave-one-out checks and benchmarks."""

    contract: Contract
    n_images: int
    pooled: np.ndarray
    pooled_sqnorms: np.ndarray
    levels: list[np.ndarray]
    level_sqnorms: list[np.ndarray]
    path: str = "<memory>"

    @classmethod
    def from_features(
        cls, contract: Contract, levels: Sequence[np.ndarray], pooled: np.ndarray
    ) -> InMemoryGallery:
        lv16 = [np.ascontiguousarray(lv, dtype=np.float16) for lv in levels]
        p16 = np.ascontiguousarray(pooled, dtype=np.float16)
        return cls(
            contract, len(p16), p16, sqnorms_fp16(p16), lv16, [sqnorms_fp16(lv) for lv in lv16]
        )


class Gallery:
    """An open, validated gallery (memory-mapped; satisfies the matchers' GalleryArrays)."""

    contract: Contract
    n_images: int
    pooled: np.ndarray
    pooled_sqnorms: np.ndarray
    levels: list[np.ndarray]
    level_sqnorms: list[np.ndarray]

    def __init__(self, container: Container) -> None:
        self._c = container
        self.path: Path = container.path
        self.version: int = container.version
        self.manifest: dict[str, Any] = container.manifest
        self._sources: list[dict[str, str]] | None = None
        h = read_header(self.path, self.manifest, self.version)
        check_blob_layout(self.path, h, container.blob_info)
        self.header = h
        self.fingerprint: str = h.fingerprint
        self.contract = h.contract
        self.n_images = h.n_images
        self.default_k: int = h.default_k
        self.thresholds: dict[str, Any] | None = h.thresholds
        self.extra: dict[str, Any] = h.extra
        self.created: str = h.created
        self.tool_version: str = h.tool_version
        #: True once every blob's checksum (and finiteness) was checked in this process.
        self.verified = False
        self.pooled = container.blob("pooled")
        self.pooled_sqnorms = container.blob("pooled_sqnorms")
        n_levels = len(h.contract.levels)
        self.levels = [container.blob(f"level{i}") for i in range(n_levels)]
        self.level_sqnorms = [container.blob(f"level{i}_sqnorms") for i in range(n_levels)]

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> Gallery:
        """Open and validate ``path``; ``verify`` also checks every blob (:meth:`verify`)."""
        c = read_container(path, GALLERY_MAGIC, SUPPORTED_VERSIONS)
        try:
            g = cls(c)
            if verify:
                g.verify()
            return g
        except BaseException:
            c.close()
            raise

    # -- metadata --
    @property
    def sources(self) -> list[dict[str, str]]:
        """``[{"name", "sha256"}]`` per image, decoded on first use (not needed for scoring).

        Names that are not UTF-8 come back as ``os.fsdecode`` gives them (surrogateescape)."""
        if self._sources is None:
            raw = bytes(self._c.blob("source_names"))
            names = raw.decode("utf-8", "surrogateescape").split("\n")
            if len(names) != self.n_images or not all(names):
                raise FormatError(
                    f"{self.path}: gallery blob 'source_names' holds {len(names)} names "
                    f"(some empty?) for {self.n_images} images"
                )
            hashes = self._c.blob("source_sha256")
            self._sources = [
                {"name": nm, "sha256": bytes(h).hex()} for nm, h in zip(names, hashes, strict=True)
            ]
        return self._sources

    @property
    def blob_info(self) -> dict[str, Any]:
        return self._c.blob_info

    @property
    def file_size(self) -> int:
        return self._c.file_size

    def verify(self) -> None:
        """Check every blob's SHA-256 and that every feature and norm is finite (reads the
        whole file once). A file that passes is exactly what the writer wrote, and the writer
        never writes NaN/inf, so a non-finite value can only come from a crafted file."""
        nonfinite: set[str] = set()
        checks: dict[str, tuple[type[np.generic], Any]] = {}
        for i in range(len(self.contract.levels)):
            checks[f"level{i}"] = (np.float16, _nonfinite_fp16)
            checks[f"level{i}_sqnorms"] = (np.float32, _nonfinite_fp32)
        checks["pooled"] = (np.float16, _nonfinite_fp16)
        checks["pooled_sqnorms"] = (np.float32, _nonfinite_fp32)

        def check(name: str, chunk: memoryview) -> None:
            if name in checks and name not in nonfinite:
                dtype, bad = checks[name]
                if bad(np.frombuffer(chunk, dtype)):
                    nonfinite.add(name)

        self._c.verify(check)
        if nonfinite:
            raise FormatError(
                f"{self.path}: gallery blob(s) {sorted(nonfinite)} hold NaN/inf values "
                "(the checksums match, so the file was written that way; repack it)"
            )
        self.verified = True

    def data(self) -> GalleryData:
        """The gallery's content as :class:`GalleryData` (arrays are the memory-mapped blobs,
        not copies), verified first: it is what gets copied into new files."""
        if not self.verified:
            self.verify()
        return GalleryData(
            contract=self.contract,
            fingerprint=self.fingerprint,
            pooled=self.pooled,
            pooled_sqnorms=self.pooled_sqnorms,
            levels=list(self.levels),
            level_sqnorms=list(self.level_sqnorms),
            sources=self.sources,
            default_k=self.default_k,
            created=self.created,
            thresholds=self.thresholds,
            extra=self.extra,
            path=str(self.path),
        )

    def close(self) -> None:
        """Drop the mapping (arrays handed out keep it alive until they are freed)."""
        self._c.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Gallery({str(self.path)!r}, n_images={self.n_images}, "
            f"backbone={self.contract.backbone!r}, model={self.fingerprint[:12]})"
        )


# -------------------------------------------------------------------------- rewrite / append


def rewrite_gallery(
    src: Gallery,
    dst: str | Path,
    thresholds: dict[str, Any] | None = KEEP,
    default_k: int = KEEP,
    extra: dict[str, Any] | None = KEEP,
) -> None:
    """Write ``src`` to ``dst`` (may be ``src.path``) atomically with a changed manifest.

    ``src`` is verified first (its blobs are copied). Feature blobs are copied straight from the
    mapping (no re-rounding), so only the named manifest fields change; everything else,
    including ``created``, is kept.
    """
    p = Path(dst)
    data = src.data()
    changes: dict[str, Any] = {"path": str(p)}
    if thresholds is not KEEP:
        changes["thresholds"] = thresholds
    if default_k is not KEEP:
        changes["default_k"] = _check_default_k(default_k, src.n_images, p)
    if extra is not KEEP:
        changes["extra"] = extra or {}
    save_gallery(p, replace(data, **changes))


def duplicate_indices(
    known: Sequence[dict[str, str]], new: Sequence[dict[str, str]]
) -> list[tuple[int, str]]:
    """Indices into ``new`` whose content hash is already in ``known`` or earlier in ``new``,
    each with the name of the image it duplicates."""
    seen = {s["sha256"]: s["name"] for s in known}
    dup = []
    for i, s in enumerate(new):
        if s["sha256"] in seen:
            dup.append((i, seen[s["sha256"]]))
        else:
            seen[s["sha256"]] = s["name"]
    return dup


def appended(
    src: Gallery,
    pooled: np.ndarray,
    levels: Sequence[np.ndarray],
    sources: Sequence[dict[str, Any]],
    *,
    path: str | Path = "<new gallery>",
    created: str | None = None,
    sqnorms: tuple[np.ndarray, list[np.ndarray]] | None = None,
) -> GalleryData:
    """``src`` (verified first) + new images, in memory, thresholds dropped (they describe
    ``src``'s images; recompute them on the union). A ``default_k`` that was capped by a small
    base grows with the gallery up to ``DEFAULT_K``."""
    p = Path(path)
    base = src.data()
    new = prepare_gallery(
        p, src.contract, src.fingerprint, pooled, levels, sources, sqnorms=sqnorms
    )
    n = base.n_images + new.n_images
    if n > MAX_IMAGES:
        raise InputError(f"{p}: {n} images; a gallery holds at most {MAX_IMAGES}")
    default_k = base.default_k
    if default_k < DEFAULT_K and default_k == base.n_images:
        default_k = min(DEFAULT_K, n)
    return GalleryData(
        contract=base.contract,
        fingerprint=base.fingerprint,
        pooled=np.concatenate([base.pooled, new.pooled]),
        pooled_sqnorms=np.concatenate([base.pooled_sqnorms, new.pooled_sqnorms]),
        levels=[np.concatenate(ab) for ab in zip(base.levels, new.levels, strict=True)],
        level_sqnorms=[
            np.concatenate(ab) for ab in zip(base.level_sqnorms, new.level_sqnorms, strict=True)
        ],
        sources=_check_sources(base.sources + new.sources, n, p),
        default_k=default_k,
        created=created or utc_timestamp(),
        thresholds=None,
        extra=base.extra,
        path=str(p),
    )


def append_gallery(
    src: Gallery,
    dst: str | Path,
    pooled: np.ndarray,
    levels: list[np.ndarray],
    sources: list[dict[str, Any]],
    created: str | None = None,
) -> int:
    """Write a NEW gallery ``dst`` = ``src`` + new images (``dst`` may be ``src.path``).

    The new features must come from the same model (the caller checks the fingerprint) and
    must not repeat content already present (InputError; filter with :func:`duplicate_indices`
    first to skip instead). Existing fp16 features and norms are copied unchanged, after
    verifying them. The result has no thresholds (recompute them on the union: the packer
    does). Returns the new image count.
    """
    data = appended(src, pooled, levels, sources, path=dst, created=created)
    save_gallery(dst, data)
    return data.n_images


def describe(g: Gallery) -> dict[str, Any]:
    """JSON-able summary for spade-inspect."""
    c = g.contract
    payload = sum(bi.nbytes for bi in g.blob_info.values())
    return {
        "kind": "gallery",
        "path": str(g.path),
        "format_version": g.version,
        "tool_version": g.tool_version,
        "model_fingerprint": g.fingerprint,
        **c.summary(),
        "n_images": g.n_images,
        "default_k": g.default_k,
        "thresholds": g.thresholds,
        "created": g.created,
        "extra": g.extra,
        "file_bytes": g.file_size,
        "payload_bytes": payload,
        "bytes_per_image": math.floor(payload / g.n_images),
        "blobs": {
            name: {"dtype": bi.dtype, "shape": list(bi.shape), "nbytes": bi.nbytes}
            for name, bi in g.blob_info.items()
        },
        "contract": c.to_dict(),
    }


__all__ = [
    "DEFAULT_K",
    "GALLERY_MAGIC",
    "GALLERY_VERSION",
    "KEEP",
    "Gallery",
    "GalleryData",
    "GalleryHeader",
    "InMemoryGallery",
    "append_gallery",
    "appended",
    "bytes_per_image",
    "check_source_name",
    "describe",
    "duplicate_indices",
    "encode_name",
    "prepare_gallery",
    "rewrite_gallery",
    "save_gallery",
    "sqnorms_fp16",
    "write_gallery",
]
