"""Pack the features of normal images into a gallery file (the engine behind ``spade-pack``).

Decoding runs in a small thread pool a few batches ahead of inference (Pillow and NumPy
release the GIL), so packing costs little more than the bare backbone. Unreadable images fail
the pack by default, naming the file: a gallery silently missing images is worse than a
failed pack; ``skip_bad`` turns that into a warning. An image whose features come out
non-finite (NaN/inf input) is a bad image of its own, handled the same way. The same content
(SHA-256 of the file bytes) packed twice is an error unless ``skip_duplicates`` is set.

Nothing is written until every image is processed AND the anomaly thresholds are computed
(leave-one-out over the new gallery, in memory); then one atomic write. So a killed or failed
pack leaves the old file (or none), never features without their thresholds. With ``--add-to``
the base gallery is verified before its blobs are copied, and its thresholds are recomputed
on the union (they described the base's images only).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.compat import check_gallery
from spade_edge.runtime.contract import Contract
from spade_edge.runtime.errors import ConfigError, FormatError, ImageDecodeError, InputError
from spade_edge.runtime.fileio import file_sha256
from spade_edge.runtime.gallery import (
    Gallery,
    GalleryData,
    appended,
    check_source_name,
    duplicate_indices,
    prepare_gallery,
    save_gallery,
    sqnorms_fp16,
)
from spade_edge.runtime.preprocess import Prepared, list_images, prepare_path, read_ahead
from spade_edge.runtime.progress import progress_bar
from spade_edge.runtime.runners import Runner, open_runner
from spade_edge.runtime.thresholds import DEFAULT_FAR, MIN_IMAGES, compute_thresholds

log = logging.getLogger(__name__)


@dataclass
class PackReport:
    """What a pack did; ``skipped_*`` hold (file, reason or duplicated file).

    ``infer_seconds``: time inside ``runner.infer``; ``decode_wait_seconds``: time inference
    waited for decoding (0 when decoding keeps ahead); ``threshold_seconds``: leave-one-out;
    ``write_seconds``: checksums + atomic write. ``thresholds``: what was stored (None: see
    ``thresholds_note``).
    """

    path: Path
    n_images: int
    n_added: int
    n_base: int
    fingerprint: str
    backend: str
    seconds: float
    infer_seconds: float
    file_bytes: int
    decode_wait_seconds: float = 0.0
    write_seconds: float = 0.0
    threshold_seconds: float = 0.0
    thresholds: dict[str, Any] | None = None
    thresholds_note: str | None = None
    skipped_bad: list[tuple[str, str]] = field(default_factory=list)
    skipped_duplicates: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.n_added / self.seconds if self.seconds > 0 else float("nan")

    @property
    def bytes_per_image(self) -> float:
        return self.file_bytes / self.n_images


def _image_sha256(path: Path) -> str:
    """Content hash of an image file (identifies the same image under another name)."""
    return file_sha256(path, ImageDecodeError)


def _checked_far(far: float | None) -> float | None:
    """``None``/0 = no thresholds; otherwise a false-alarm rate in (0, 1) (ConfigError)."""
    if far is None or far == 0:
        return None
    if not 0.0 < far < 1.0:  # NaN fails this too
        raise ConfigError(f"--far must be 0 (no thresholds) or in (0, 1), got {far}")
    return float(far)


# ------------------------------------------------------------------------------ the steps


def _open_base(
    base_gallery: str | Path | Gallery, runner: Runner, model_path: str | Path, stack: ExitStack
) -> Gallery:
    """The gallery to extend, verified (its blobs are copied) and packed by this exact model."""
    if isinstance(base_gallery, Gallery):
        base = base_gallery
    else:
        base = stack.enter_context(Gallery.open(base_gallery))
    if not base.verified:
        base.verify()
    # exact model only: features of a derived (fp16/INT8) model must not be mixed in
    check_gallery(base, runner, str(model_path), allow_derived=False)
    return base


@dataclass
class _Sources:
    todo: list[tuple[Path, dict[str, str]]]
    skipped_bad: list[tuple[str, str]]
    skipped_duplicates: list[tuple[str, str]]


def _hash_sources(
    paths: list[Path],
    known: Sequence[dict[str, str]],
    pool: ThreadPoolExecutor,
    advance: Callable[[], None],
    skip_bad: bool,
    skip_duplicates: bool,
) -> _Sources:
    """Content hashes (cheap) so duplicates and unstorable names are known before inference."""
    sources: list[dict[str, str]] = []
    hashed: list[Path] = []
    skipped_bad: list[tuple[str, str]] = []
    for p, fut in [(p, pool.submit(_image_sha256, p)) for p in paths]:
        try:
            name = check_source_name(str(p), str(p))
            sources.append({"name": name, "sha256": fut.result()})
            hashed.append(p)
        except InputError as e:
            if not skip_bad:
                raise
            skipped_bad.append((str(p), str(e)))
        advance()
    dups = duplicate_indices(known, sources)
    if dups and not skip_duplicates:
        i, other = dups[0]
        raise InputError(
            f"{sources[i]['name']}: same content as {other} (SHA-256 "
            f"{sources[i]['sha256'][:16]}…); {len(dups)} duplicate(s) in total — "
            "remove them or pass --skip-duplicates"
        )
    drop = {i for i, _ in dups}
    todo = [(p, s) for k, (p, s) in enumerate(zip(hashed, sources, strict=True)) if k not in drop]
    return _Sources(todo, skipped_bad, [(sources[i]["name"], other) for i, other in dups])


class _FeatureBuffers:
    """fp16 features and their float32 norms of up to ``n`` images, filled batch by batch."""

    def __init__(self, contract: Contract, n: int, model: str) -> None:
        self.contract = contract
        self.model = model
        self.pooled = np.empty((n, contract.pooled_dim), np.float16)
        self.levels = [
            np.empty((n, lv.height, lv.width, lv.channels), np.float16) for lv in contract.levels
        ]
        self.pooled_sq = np.empty(n, np.float32)
        self.level_sq = [np.empty(lv.shape[:-1], np.float32) for lv in self.levels]

    def store(self, feats: Any, i0: int, b: int) -> list[int]:
        """Copy one batch of host features in and compute their squared norms (``sqnorms_fp16``
        row by row, so the result equals computing them on the whole gallery). Returns the
        rows whose features are not finite (NaN/inf, or beyond fp16's range)."""
        if len(feats.levels) != len(self.levels):
            raise FormatError(
                f"{self.model}: model returned {len(feats.levels)} levels, "
                f"contract has {len(self.levels)}"
            )
        pv = np.asarray(feats.pooled).reshape(b, -1)
        if pv.shape[1] != self.pooled.shape[1]:
            raise FormatError(
                f"{self.model}: pooled output has {pv.shape[1]} channels, "
                f"contract says {self.pooled.shape[1]}"
            )
        rows = slice(i0, i0 + b)
        bad = np.zeros(b, bool)
        # out-of-range values become inf here; such rows are reported, never written
        with np.errstate(over="ignore", invalid="ignore"):
            self.pooled[rows] = pv
            self.pooled_sq[rows] = sqnorms_fp16(self.pooled[rows])
        bad |= ~np.isfinite(self.pooled_sq[rows])
        for lv, dst, dst_sq, a in zip(
            self.contract.levels, self.levels, self.level_sq, feats.levels, strict=True
        ):
            if tuple(a.shape) != (b, *dst.shape[1:]):
                raise FormatError(
                    f"{self.model}: output {lv.name!r} has shape {list(a.shape)}, contract says "
                    f"[{b}, {lv.height}, {lv.width}, {lv.channels}] (channels-last)"
                )
            with np.errstate(over="ignore", invalid="ignore"):
                dst[rows] = a
                dst_sq[rows] = sqnorms_fp16(dst[rows])
            bad |= ~np.isfinite(dst_sq[rows].reshape(b, -1)).all(axis=1)
        return [i0 + int(i) for i in np.flatnonzero(bad)]

    def take(self, keep: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, list[Any]]:
        """(pooled, levels, pooled norms, level norms) of the rows selected by ``keep``."""
        if keep.all():  # the common case: views, no copy
            n = len(keep)
            return (
                self.pooled[:n],
                [lv[:n] for lv in self.levels],
                self.pooled_sq[:n],
                [sq[:n] for sq in self.level_sq],
            )
        idx = np.flatnonzero(keep)
        return (
            self.pooled[idx],
            [lv[idx] for lv in self.levels],
            self.pooled_sq[idx],
            [sq[idx] for sq in self.level_sq],
        )


@dataclass
class _Inferred:
    sources: list[dict[str, str]]
    keep: np.ndarray
    skipped_bad: list[tuple[str, str]]
    infer_seconds: float
    decode_wait_seconds: float


def _infer_all(
    runner: Runner,
    todo: list[tuple[Path, dict[str, str]]],
    buffers: _FeatureBuffers,
    pool: ThreadPoolExecutor,
    store_pool: ThreadPoolExecutor,
    batch_size: int,
    lookahead: int,
    skip_bad: bool,
    advance: Callable[[int, int], None],
) -> _Inferred:
    """Decode ahead in the pool, infer in batches on this thread; fp16 cast + norms of batch i
    run on ``store_pool`` while batch i+1 is inferred. Bad images (undecodable, non-finite
    input or features) fail the pack naming the image, or are skipped with ``skip_bad``."""
    kept: list[dict[str, str]] = []
    skipped_bad: list[tuple[str, str]] = []
    bad_rows: set[int] = set()
    stores: deque[Future[list[int]]] = deque()
    infer_s = wait_s = 0.0
    batch: list[np.ndarray] = []
    batch_src: list[dict[str, str]] = []

    def collect(fut: Future[list[int]]) -> None:
        for row in fut.result():
            name = kept[row]["name"]
            why = f"{name}: model features are not finite (NaN/inf in the image?)"
            if not skip_bad:
                raise InputError(why)
            bad_rows.add(row)
            skipped_bad.append((name, why))

    def flush() -> None:
        nonlocal infer_s
        if not batch:
            return
        t0 = time.perf_counter()
        feats = runner.infer(np.stack(batch)).to_host()
        infer_s += time.perf_counter() - t0
        stores.append(store_pool.submit(buffers.store, feats, len(kept), len(batch)))
        kept.extend(batch_src)
        while len(stores) > 2:  # bounded: at most two batches of features in flight
            collect(stores.popleft())
        advance(len(batch), len(kept))
        batch.clear()
        batch_src.clear()

    try:

        def decode(item: tuple[Path, dict[str, str]]) -> Prepared:
            return prepare_path(item[0], buffers.contract)

        for (p, src), fut in read_ahead(todo, decode, pool, lookahead):
            t0 = time.perf_counter()
            try:
                prep = fut.result()
            except InputError as e:  # ImageDecodeError, non-finite input, ...
                if not skip_bad:
                    raise
                skipped_bad.append((str(p), str(e)))
                advance(1, len(kept))
                continue
            finally:
                wait_s += time.perf_counter() - t0
            batch.append(prep.tensor)
            batch_src.append(src)
            if len(batch) == batch_size:
                flush()
        flush()
        while stores:
            collect(stores.popleft())
    finally:
        for st in stores:
            st.cancel()
    keep = np.ones(len(kept), bool)
    keep[list(bad_rows)] = False
    return _Inferred([s for i, s in enumerate(kept) if keep[i]], keep, skipped_bad, infer_s, wait_s)


def _threshold_settings(
    far: float | None, base: Gallery | None
) -> tuple[float | None, dict[str, Any]]:
    """(far, extra arguments of compute_thresholds): the caller's far, else the base gallery's
    calibration settings (far, K, sigma), else DEFAULT_FAR at the gallery's default K."""
    old = (base.thresholds or {}) if base is not None else {}
    kw: dict[str, Any] = {}
    for key in ("k_image", "k_gallery", "sigma"):
        if key in old:
            kw[key] = old[key]
    if far is None:
        old_far = old.get("far")
        far = old_far if isinstance(old_far, float) and 0 < old_far < 1 else DEFAULT_FAR
    return _checked_far(far), kw


def _with_thresholds(
    data: GalleryData,
    far: float | None,
    settings: dict[str, Any],
    base: Gallery | None,
    advance: Callable[[int], None],
) -> tuple[GalleryData, str | None]:
    """``data`` with its leave-one-out thresholds (or none, with the reason)."""
    had = base is not None and base.thresholds is not None
    dropped = (
        f"; the base gallery's thresholds were dropped (they describe its {base.n_images} "
        "images): run spade-threshold on the result"
        if had and base is not None
        else ""
    )
    if far is None:
        return data, "thresholds not computed (--far 0)" + dropped
    k = max(settings.get("k_image", data.default_k), settings.get("k_gallery", data.default_k))
    need = max(MIN_IMAGES, k + 1)
    if data.n_images < need:
        return data, (f"{data.n_images} images; thresholds need >= {need} (none stored){dropped}")
    th = compute_thresholds(data, far, progress=advance, **settings)
    return replace(data, thresholds=th), None


# ------------------------------------------------------------------------------ the pack


def pack(
    model_path: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    batch_size: int = 8,
    backend: str = "auto",
    progress: bool = True,
    base_gallery: str | Path | Gallery | None = None,
    skip_bad: bool = False,
    skip_duplicates: bool = False,
    verify: bool = False,
    workers: int | None = None,
    default_k: int | None = None,
    created: str | None = None,
    far: float | None = None,
) -> PackReport:
    """Run the model over ``images`` (files or folders) and write the gallery ``out``, with
    its anomaly thresholds, in one atomic write.

    ``base_gallery``: append to this gallery (packed with the same model; verified first) and
    write the union to ``out`` (a new file, which may be the base's own path). ``far``:
    false-alarm rate of the stored thresholds; None = the base gallery's calibration settings
    with ``base_gallery``, else 0.01; 0 = no thresholds. ``default_k``: None stores
    ``min(5, n)``. ``verify`` re-opens the result and checks every SHA-256.
    """
    t_start = time.perf_counter()
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    _checked_far(far)
    out = Path(out)
    paths = list_images(list(images))
    if not paths:
        raise InputError("no images given to pack")
    with ExitStack() as stack:
        runner = open_runner(model_path, backend)
        stack.callback(runner.close)
        base = None if base_gallery is None else _open_base(base_gallery, runner, model_path, stack)
        far_used, settings = _threshold_settings(far, base)
        bs = min(batch_size, runner.max_batch) if runner.max_batch else batch_size
        # decoding costs a fraction of inference: half the cores keep it ahead without
        # starving the backbone of CPU
        n_workers = workers or max(1, min(4, (os.cpu_count() or 2) // 2))
        bar = stack.enter_context(progress_bar(progress))
        pool = stack.enter_context(ThreadPoolExecutor(n_workers))
        store_pool = stack.enter_context(ThreadPoolExecutor(1))

        task = bar.add_task("hashing", total=len(paths), note="")
        srcs = _hash_sources(
            paths,
            base.sources if base is not None else [],
            pool,
            lambda: bar.advance(task),
            skip_bad,
            skip_duplicates,
        )
        bar.update(task, visible=False)

        buffers = _FeatureBuffers(runner.contract, len(srcs.todo), str(model_path))
        task = bar.add_task("packing", total=len(srcs.todo), note="")

        def advance(n: int, done: int) -> None:
            rate = done / max(time.perf_counter() - t_start, 1e-9)
            bar.update(task, advance=n, note=f"{rate:.1f} img/s")

        inferred = _infer_all(
            runner,
            srcs.todo,
            buffers,
            pool,
            store_pool,
            bs,
            max(2 * bs, 2 * n_workers),
            skip_bad,
            advance,
        )
        skipped_bad = srcs.skipped_bad + inferred.skipped_bad
        for name, why in skipped_bad:
            log.warning("skipped unreadable image %s: %s", name, why)
        for name, other in srcs.skipped_duplicates:
            log.warning("skipped %s: same content as %s", name, other)
        n = len(inferred.sources)
        if n == 0:
            raise InputError("no readable images left to pack (all were skipped)")

        pooled, levels, pooled_sq, level_sq = buffers.take(inferred.keep)
        sqnorms = (pooled_sq, level_sq)
        if base is not None:
            data = appended(
                base, pooled, levels, inferred.sources, path=out, created=created, sqnorms=sqnorms
            )
        else:
            data = prepare_gallery(
                out,
                runner.contract,
                runner.fingerprint,
                pooled,
                levels,
                inferred.sources,
                default_k=default_k,
                created=created,
                sqnorms=sqnorms,
            )

        t_th = time.perf_counter()
        task = bar.add_task("thresholds", total=data.n_images, note="leave-one-out")
        data, note = _with_thresholds(
            data, far_used, settings, base, lambda k: bar.advance(task, k)
        )
        bar.update(task, visible=False)
        if note:
            log.warning("%s: %s", out, note)
        t_write = time.perf_counter()
        save_gallery(out, data)
        write_s = time.perf_counter() - t_write
        if verify:
            with Gallery.open(out, verify=True) as g:
                check_gallery(g, runner, str(model_path), allow_derived=False)
        return PackReport(
            path=out,
            n_images=data.n_images,
            n_added=n,
            n_base=data.n_images - n,
            fingerprint=runner.fingerprint,
            backend=getattr(runner, "name", backend),
            seconds=time.perf_counter() - t_start,
            infer_seconds=inferred.infer_seconds,
            file_bytes=out.stat().st_size,
            decode_wait_seconds=inferred.decode_wait_seconds,
            write_seconds=write_s,
            threshold_seconds=t_write - t_th,
            thresholds=data.thresholds,
            thresholds_note=note,
            skipped_bad=skipped_bad,
            skipped_duplicates=srcs.skipped_duplicates,
        )
    raise AssertionError("unreachable")  # pragma: no cover (ExitStack does not swallow)


__all__ = ["PackReport", "pack"]
