"""Pack the features of normal images into a gallery file (the engine behind ``spade-pack``).

Decoding runs in a small thread pool a few batches ahead of inference (Pillow and NumPy
release the GIL), so packing costs little more than the bare backbone. Unreadable images fail
the pack by default, naming the file: a gallery silently missing images is worse than a
failed pack; ``skip_bad`` turns that into a warning. The same content (SHA-256 of the file
bytes) packed twice is an error unless ``skip_duplicates`` is set. Nothing is written until
every image is processed, and then atomically, so an interrupted pack leaves no file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.errors import FormatError, ImageDecodeError, InputError
from spade_edge.runtime.gallery import (
    Gallery,
    append_gallery,
    duplicate_indices,
    sqnorms_fp16,
    write_gallery,
)
from spade_edge.runtime.preprocess import Prepared, list_images, prepare_path
from spade_edge.runtime.runners import open_runner

log = logging.getLogger(__name__)


@dataclass
class PackReport:
    """What a pack did; ``skipped_*`` hold (file, reason or duplicated file).

    ``infer_seconds``: time inside ``runner.infer``; ``decode_wait_seconds``: time inference
    waited for decoding (0 when decoding keeps ahead); ``write_seconds``: norms + checksums +
    atomic write.
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
    skipped_bad: list[tuple[str, str]] = field(default_factory=list)
    skipped_duplicates: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.n_added / self.seconds if self.seconds > 0 else float("nan")

    @property
    def bytes_per_image(self) -> float:
        return self.file_bytes / self.n_images


def file_sha256(path: Path) -> str:
    """Content hash of an image file (identifies the same image under another name)."""
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot read image file: {e.strerror or e}") from None
    return h.hexdigest()


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


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
    default_k: int = 5,
    created: str | None = None,
) -> PackReport:
    """Run the model over ``images`` (files or folders) and write the gallery ``out``.

    ``base_gallery``: append to this gallery (packed with the same model) and write the
    union to ``out`` (a new file, which may be the base's own path). ``verify`` re-opens the
    result and checks every SHA-256.
    """
    t_start = time.perf_counter()
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    out = Path(out)
    paths = list_images(list(images))
    if not paths:
        raise InputError("no images given to pack")
    runner = open_runner(model_path, backend)
    base: Gallery | None = None
    owns_base = False
    try:
        contract, fingerprint = runner.contract, runner.fingerprint
        if base_gallery is not None:
            if isinstance(base_gallery, Gallery):
                base = base_gallery
            else:
                base = Gallery.open(base_gallery)
                owns_base = True
            # exact model only: features of a derived (fp16/INT8) model must not be mixed in
            base.check_model(fingerprint, str(model_path))
        bs = min(batch_size, runner.max_batch) if runner.max_batch else batch_size
        # decoding costs a fraction of inference: half the cores keep it ahead without
        # starving the backbone of CPU
        n_workers = workers or max(1, min(4, (os.cpu_count() or 2) // 2))
        skipped_bad: list[tuple[str, str]] = []
        skipped_dup: list[tuple[str, str]] = []

        with (
            _progress(progress) as bar,
            ThreadPoolExecutor(n_workers) as pool,
            ThreadPoolExecutor(1) as store_pool,
        ):
            # 1. content hashes (cheap) so duplicates are known before any inference
            task = bar.add_task("hashing", total=len(paths), rate="")
            sources: list[dict[str, str]] = []
            hashed: list[Path] = []
            for p, fut in [(p, pool.submit(file_sha256, p)) for p in paths]:
                try:
                    sources.append({"name": str(p), "sha256": fut.result()})
                    hashed.append(p)
                except ImageDecodeError as e:
                    if not skip_bad:
                        raise
                    skipped_bad.append((str(p), str(e)))
                bar.advance(task)
            dups = duplicate_indices(base.sources if base is not None else [], sources)
            if dups and not skip_duplicates:
                i, other = dups[0]
                raise InputError(
                    f"{sources[i]['name']}: same content as {other} (SHA-256 "
                    f"{sources[i]['sha256'][:16]}…); {len(dups)} duplicate(s) in total — "
                    "remove them or pass --skip-duplicates"
                )
            drop = {i for i, _ in dups}
            skipped_dup = [(sources[i]["name"], other) for i, other in dups]
            todo = [
                (p, s)
                for k, (p, s) in enumerate(zip(hashed, sources, strict=True))
                if k not in drop
            ]
            bar.update(task, visible=False)

            # 2. decode ahead in the pool, infer in batches on this thread
            n_max = len(todo)
            pooled = np.empty((n_max, contract.pooled_dim), np.float16)
            levels = [
                np.empty((n_max, lv.height, lv.width, lv.channels), np.float16)
                for lv in contract.levels
            ]
            pooled_sq = np.empty(n_max, np.float32)
            level_sq = [np.empty(lv.shape[:-1], np.float32) for lv in levels]
            # fp16 cast + norms of batch i run on this thread while batch i+1 is inferred
            # (overlaps wherever the backbone leaves a core free: GPU runners, ORT threads < cores)
            stores: deque[Future[None]] = deque()
            kept: list[dict[str, str]] = []
            infer_s = wait_s = 0.0
            task = bar.add_task("packing", total=n_max, rate="")
            queue: deque[tuple[Path, dict[str, str], Future[Prepared]]] = deque()
            pending = iter(todo)
            lookahead = max(2 * bs, 2 * n_workers)

            def refill() -> None:
                while len(queue) < lookahead:
                    nxt = next(pending, None)
                    if nxt is None:
                        return
                    queue.append((nxt[0], nxt[1], pool.submit(prepare_path, nxt[0], contract)))

            batch: list[np.ndarray] = []
            batch_src: list[dict[str, str]] = []

            def flush() -> None:
                nonlocal infer_s
                if not batch:
                    return
                x = np.stack(batch)
                t0 = time.perf_counter()
                feats = runner.infer(x).to_host()
                infer_s += time.perf_counter() - t0
                i0 = len(kept)
                stores.append(
                    store_pool.submit(
                        _store,
                        feats,
                        contract,
                        str(model_path),
                        (pooled, pooled_sq),
                        list(zip(levels, level_sq, strict=True)),
                        i0,
                        len(batch),
                    )
                )
                while len(stores) > 2:  # bounded: at most two batches of features in flight
                    stores.popleft().result()
                kept.extend(batch_src)
                bar.update(
                    task,
                    advance=len(batch),
                    rate=f"{len(kept) / max(time.perf_counter() - t_start, 1e-9):.1f} img/s",
                )
                batch.clear()
                batch_src.clear()

            try:
                refill()
                while queue:
                    p, src, fut = queue.popleft()
                    refill()
                    t0 = time.perf_counter()
                    try:
                        prep = fut.result()
                    except (ImageDecodeError, InputError) as e:
                        if not skip_bad:
                            raise
                        skipped_bad.append((str(p), str(e)))
                        bar.advance(task)
                        continue
                    finally:
                        wait_s += time.perf_counter() - t0
                    batch.append(prep.tensor)
                    batch_src.append(src)
                    if len(batch) == bs:
                        flush()
                flush()
                while stores:
                    stores.popleft().result()
            finally:
                for _, _, fut in queue:
                    fut.cancel()
                for st in stores:
                    st.cancel()

        for name, why in skipped_bad:
            log.warning("skipped unreadable image %s: %s", name, why)
        for name, other in skipped_dup:
            log.warning("skipped %s: same content as %s", name, other)
        n = len(kept)
        if n == 0:
            raise InputError("no readable images left to pack (all were skipped)")
        t_write = time.perf_counter()
        if base is not None:
            total = append_gallery(
                base, out, pooled[:n], [lv[:n] for lv in levels], kept, created=created
            )
        else:
            write_gallery(
                out,
                contract,
                fingerprint,
                pooled[:n],
                [lv[:n] for lv in levels],
                kept,
                default_k=default_k,
                created=created,
                sqnorms=(pooled_sq[:n], [sq[:n] for sq in level_sq]),
            )
            total = n
        write_s = time.perf_counter() - t_write
        if verify:
            with Gallery.open(out, verify=True) as g:
                g.check_model(fingerprint, str(model_path))
        return PackReport(
            path=out,
            n_images=total,
            n_added=n,
            n_base=total - n,
            fingerprint=fingerprint,
            backend=getattr(runner, "name", backend),
            seconds=time.perf_counter() - t_start,
            infer_seconds=infer_s,
            file_bytes=out.stat().st_size,
            decode_wait_seconds=wait_s,
            write_seconds=write_s,
            skipped_bad=skipped_bad,
            skipped_duplicates=skipped_dup,
        )
    finally:
        runner.close()
        if owns_base and base is not None:
            base.close()


def _store(
    feats: Any,
    contract: Any,
    model: str,
    pooled: tuple[np.ndarray, np.ndarray],
    levels: list[tuple[np.ndarray, np.ndarray]],
    i0: int,
    b: int,
) -> None:
    """Copy one batch of host features into the fp16 buffers and compute their squared norms
    (``sqnorms_fp16`` row by row, so the result equals computing them on the whole gallery)."""
    if len(feats.levels) != len(levels):
        raise FormatError(
            f"{model}: model returned {len(feats.levels)} levels, contract has {len(levels)}"
        )
    pv = np.asarray(feats.pooled).reshape(b, -1)
    dst, dst_sq = pooled
    if pv.shape[1] != dst.shape[1]:
        raise FormatError(
            f"{model}: pooled output has {pv.shape[1]} channels, contract says {dst.shape[1]}"
        )
    # out-of-range values become inf here; write_gallery refuses them with a clear message
    with np.errstate(over="ignore", invalid="ignore"):
        dst[i0 : i0 + b] = pv
        dst_sq[i0 : i0 + b] = sqnorms_fp16(dst[i0 : i0 + b])
    for lv, (dst, dst_sq), a in zip(contract.levels, levels, feats.levels, strict=True):
        if tuple(a.shape) != (b, *dst.shape[1:]):
            raise FormatError(
                f"{model}: output {lv.name!r} has shape {list(a.shape)}, contract says "
                f"[{b}, {lv.height}, {lv.width}, {lv.channels}] (channels-last)"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            dst[i0 : i0 + b] = a
            dst_sq[i0 : i0 + b] = sqnorms_fp16(dst[i0 : i0 + b])


__all__ = ["PackReport", "file_sha256", "pack"]
