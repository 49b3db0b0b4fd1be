"""``InspectionService``: the HTTP-independent core of spade-serve.

decode (thread pool, the same bounded decoder as ``spade-run``) -> bounded queue -> the device's
inference worker (micro-batches) -> regions + record -> archive commit -> listeners. The HTTP
layer (app.py), the station's sources (watch folder, camera) and tests all call
:meth:`InspectionService.inspect`; a result is returned only after its row is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spade_edge.runtime.compat import check_gallery
from spade_edge.runtime.detector import Detector, project_to_original
from spade_edge.runtime.errors import InputError, SpadeError
from spade_edge.runtime.gallery import Gallery, duplicate_indices
from spade_edge.runtime.matchers import open_matcher
from spade_edge.runtime.preprocess import (
    Geometry,
    Prepared,
    display_rgb,
    load_image,
    prepare_bytes,
    preprocess,
)
from spade_edge.runtime.regions import defect_regions
from spade_edge.runtime.runners import Runner, open_runner
from spade_edge.runtime.visualize import overlay, save_png
from spade_edge.serve.archive import Archive, Pending, utc_now
from spade_edge.serve.config import ACCEPTED_FORMATS, ServeConfig
from spade_edge.serve.errors import (
    ConflictError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    RequestTimeoutError,
    TooLargeError,
)
from spade_edge.serve.galleries import GalleryStore, Version
from spade_edge.serve.metrics import Metrics
from spade_edge.serve.worker import Active, InferenceWorker, Job, Scored

log = logging.getLogger(__name__)

#: File extension stored for each accepted format, by magic bytes.
_MAGIC_EXT = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8", "jpg"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "bmp": "image/bmp", "tif": "image/tiff"}
MAX_LABEL = 256  # part_id / station length


def sniff_ext(data: bytes) -> str:
    """The stored extension of an image that decoded as one of ACCEPTED_FORMATS."""
    for magic, ext in _MAGIC_EXT:
        if data.startswith(magic):
            return ext
    return "bin"


def check_label(name: str, value: str | None) -> str | None:
    """part_id / station: short printable text (they end up in CSV files and MQTT topics)."""
    if value is None:
        return None
    if not value or len(value) > MAX_LABEL or not value.isprintable():
        raise InputError(f"{name} must be 1..{MAX_LABEL} printable characters")
    return value


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a part came from (stored with its verdict)."""

    part_id: str | None
    station: str | None
    source: str
    source_file: str | None


class InspectionService:
    """Model + versioned gallery + archive + worker; ``inspect`` per part (async)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.archive = Archive(config.archive, config.keep_images, config.image_budget_bytes)
        self.galleries = GalleryStore(self.archive.folder, self.archive.db_path)
        self._inflight = 0
        self.metrics = Metrics(self.queue_depth, lambda: self._inflight)
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="spade-decode")
        self._runner: Runner | None = None
        self._worker: InferenceWorker | None = None
        self._decoding = 0  # admitted requests not yet queued for the device
        self._stopping = False
        self._gallery_lock: asyncio.Lock | None = None
        self.ready = False
        self.load_error: str | None = None
        self.model_fingerprint = ""

    # ------------------------------------------------------------------------ life cycle
    def load(self) -> None:
        """Open model and the current gallery version, run one warm-up inference, start the
        worker. Blocking; typed errors for a bad model/gallery."""
        try:
            origin = Path(self.config.gallery)
            resumed, sha = self.galleries.resume(origin)
            self._runner = open_runner(self.config.model, self.config.backend)
            self.model_fingerprint = self._runner.fingerprint
            # the start gallery is validated (and checked against the model) before it is
            # recorded as a version: a bad file never becomes "current"
            det = self._detector(resumed.path if resumed else origin)
            v = resumed or self.galleries.adopt(origin, sha)
            warm = preprocess(
                Image.new("RGB", (det.contract.image_size,) * 2, (128, 128, 128)),
                det.contract,
                "<warm-up>",
            )
            det.score_prepared([warm])
        except BaseException as e:
            self.load_error = str(e)
            if self._runner is not None:
                self._runner.close()
                self._runner = None
            raise
        self._worker = InferenceWorker(
            Active(v.version, det),
            max_batch=self.config.max_batch,
            max_wait_s=self.config.max_wait_ms / 1000.0,
            queue_size=self.config.queue,
            on_batch=self.metrics.batch_size.observe,
            more_coming=lambda: self._decoding > 0,
        )
        self._set_gallery_metrics(v)
        self.ready = True
        log.info("serving gallery v%d (%d images)", v.version, v.n_images)

    def _detector(self, path: Path) -> Detector:
        assert self._runner is not None
        g = Gallery.open(path, verify=self.config.verify)
        try:
            check_gallery(g, self._runner, str(self.config.model))
            k = self.config.k or g.default_k
            try:
                m = open_matcher(g, self.config.matcher, k_image=k, k_gallery=k)
            except SpadeError as e:
                raise type(e)(f"{path}: {e}") from None
        except BaseException:
            g.close()
            raise
        return Detector(self._runner, g, m)

    def _set_gallery_metrics(self, v: Version) -> None:
        self.metrics.gallery_version.set(v.version)
        self.metrics.gallery_images.set(v.n_images)

    async def start(self) -> None:
        """Load (in a thread) unless already loaded."""
        if not self.ready:
            await asyncio.to_thread(self.load)

    def stop(self) -> None:
        """Refuse new work, finish what is queued, commit the archive, release everything."""
        self._stopping = True
        self.ready = False
        if self._worker is not None:
            self._worker.stop()
            act = self._worker.active
            with contextlib.suppress(Exception):
                act.detector.matcher.close()
            with contextlib.suppress(Exception):
                act.detector.gallery.close()
        self.archive.close()
        self._pool.shutdown(wait=True)
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        self.galleries.close()

    @property
    def in_flight(self) -> int:
        """Inspections admitted and not answered yet (decoding, queued, on the device)."""
        return self._inflight

    def queue_depth(self) -> int:
        return self._worker.depth() if self._worker is not None else 0

    @property
    def active(self) -> Active:
        if self._worker is None:
            raise NotReadyError(self.load_error or "model and gallery are still loading")
        return self._worker.active

    # ------------------------------------------------------------------------ listeners
    def add_listener(self, fn: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """``fn(result)`` runs on the event loop after each archived verdict (must not block)."""
        self._listeners.append(fn)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(fn)

        return unsubscribe

    def _notify(self, result: dict[str, Any]) -> None:
        for fn in list(self._listeners):
            try:
                fn(result)
            except Exception:
                log.exception("result listener %r failed", fn)

    # ------------------------------------------------------------------------ inspection
    def _admit(self) -> InferenceWorker:
        if self._stopping:
            raise NotReadyError("server is shutting down")
        if not self.ready or self._worker is None:
            raise NotReadyError(self.load_error or "model and gallery are still loading")
        if self._inflight >= self.config.queue:
            self.metrics.rejected.labels("overloaded").inc()
            raise OverloadedError(
                f"{self._inflight} requests in flight (--queue {self.config.queue})"
            )
        return self._worker

    async def _device(
        self, worker: InferenceWorker, prep: Prepared, kind: str, timeout: float
    ) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        job = Job(prep, loop, fut, kind=kind)
        worker.submit(job)
        try:
            return await asyncio.wait_for(fut, timeout=max(timeout, 0.001))
        except (TimeoutError, asyncio.TimeoutError):
            job.cancelled = True
            self.metrics.rejected.labels("timeout").inc()
            raise RequestTimeoutError(
                f"no verdict within {self.config.timeout_s:g} s (queue {worker.depth()})"
            ) from None

    async def inspect(
        self,
        data: bytes,
        *,
        part_id: str | None = None,
        station: str | None = None,
        source: str = "http",
        source_file: str | None = None,
    ) -> dict[str, Any]:
        """Score one image file's bytes, archive the verdict, return the API v1 result dict.

        Raises InputError (bad image: nothing archived), OverloadedError, NotReadyError,
        RequestTimeoutError.
        """
        part_id = check_label("part_id", part_id)
        station = check_label("station", station) or self.config.station
        if len(data) > self.config.max_body_bytes:
            raise TooLargeError(f"image of {len(data)} bytes exceeds --max-body-mb")
        worker = self._admit()
        self._inflight += 1
        try:
            origin = Origin(part_id, station, source, source_file)
            return await self._inspect(worker, data, origin)
        except InputError:
            self.metrics.rejected.labels("bad_input").inc()
            raise
        finally:
            self._inflight -= 1

    async def _inspect(
        self, worker: InferenceWorker, data: bytes, origin: Origin
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        name = origin.source_file or "request body"
        contract = worker.active.detector.contract
        self._decoding += 1
        try:
            prep = await loop.run_in_executor(
                self._pool, prepare_bytes, data, contract, name, ACCEPTED_FORMATS
            )
        finally:
            self._decoding -= 1
        t_decoded = time.perf_counter()
        scored: Scored = await self._device(
            worker, prep, "score", self.config.timeout_s - (t_decoded - t0)
        )
        record = await loop.run_in_executor(self._pool, self._record, scored, data, origin)
        t_done = time.perf_counter()
        lat = {
            "queue": scored.queue_s,
            "decode": t_decoded - t0,
            "infer": scored.infer_s,
            "match": scored.match_s,
            "total": t_done - t0,
        }
        record["latency_ms"] = {k: round(v * 1000.0, 3) for k, v in lat.items()}
        pending = Pending(record, data, sniff_ext(data), scored.result.anomaly_map)
        result = await asyncio.wrap_future(self.archive.submit(pending))
        lat["archive"] = time.perf_counter() - t_done
        verdict = {True: "anomalous", False: "normal", None: "unknown"}[result["anomalous"]]
        self.metrics.observe(lat, verdict, result["score"])
        self.metrics.archive_bytes.set(self.archive.file_bytes)
        self._notify(result)
        return result

    def _record(self, scored: Scored, data: bytes, origin: Origin) -> dict[str, Any]:
        res = scored.result
        rec = res.to_record()  # the numbers spade-run prints, rounded the same way
        regions = defect_regions(res.anomaly_map, res.geometry, res.pixel_threshold)
        return {
            "time": utc_now(),
            **dataclasses.asdict(origin),
            "score": rec["score"],
            "threshold": rec["threshold"],
            "anomalous": rec["anomalous"],
            "map_max": rec["map_max"],
            "pixel_threshold": rec.get("pixel_threshold"),
            "defect_fraction": rec.get("defect_fraction"),
            "regions": [r.to_dict() for r in regions],
            "model": self.model_fingerprint,
            "gallery_version": scored.version,
            "geometry": dataclasses.asdict(res.geometry),
            "image_sha256": hashlib.sha256(data).hexdigest(),
        }

    # ------------------------------------------------------------------------ archive files
    def image_file(self, rid: int) -> tuple[Path, str]:
        """Path and media type of a result's stored image (NotFoundError when not kept)."""
        row = self.archive.row(rid)
        if row["image_file"] is None:
            raise NotFoundError(f"result {rid}: image not kept (--keep-images / byte budget)")
        p = self.archive.folder / row["image_file"]
        if not p.is_file():
            raise NotFoundError(f"result {rid}: image file is gone")
        return p, MEDIA_TYPES.get(p.suffix.lstrip("."), "application/octet-stream")

    def overlay_png(self, rid: int) -> Path:
        """The heat-map overlay of a result on its original image (rendered once, then kept)."""
        row = self.archive.row(rid)
        if row["overlay_file"] and (self.archive.folder / row["overlay_file"]).is_file():
            return self.archive.folder / row["overlay_file"]
        img, _ = self.image_file(rid)
        if row["map_file"] is None:
            raise NotFoundError(f"result {rid}: anomaly map not kept")
        amap = np.load(self.archive.folder / row["map_file"], allow_pickle=False)
        geo = Geometry(**json.loads(row["geometry"]))
        rgb = display_rgb(load_image(img), geo, str(img))  # bounded: geo.display_size
        full = project_to_original(np.asarray(amap, dtype=np.float32), geo)
        pth = row["pixel_threshold"]
        vmax = 1.2 * pth if pth else float(full.max())
        rel = Path(row["image_file"]).with_name(f"{rid}.overlay.png")
        out = self.archive.folder / rel
        save_png(overlay(rgb, full, vmax), out)
        self.archive.set_overlay(rid, str(rel), out.stat().st_size)
        return out

    # ------------------------------------------------------------------------ gallery
    def _lock(self) -> asyncio.Lock:
        """One gallery change at a time (created on the serving event loop)."""
        if self._gallery_lock is None:
            self._gallery_lock = asyncio.Lock()
        return self._gallery_lock

    def gallery_info(self) -> dict[str, Any]:
        act = self.active
        det = act.detector
        cur = self.galleries.get(act.version)
        return {
            "current": act.version,
            "n_images": cur.n_images,
            "threshold": det.threshold,
            "pixel_threshold": det.pixel_threshold,
            "k": det.matcher.k_image,
            # e.g. thresholds kept from a smaller gallery: recalibrate=true recomputes them
            "thresholds_warning": getattr(det, "thresholds_warning", None),
            "versions": [v.to_dict() for v in self.galleries.versions()],
        }

    async def add_normal(
        self,
        ids: list[int] | None = None,
        image: bytes | None = None,
        recalibrate: bool = False,
        part_id: str | None = None,
    ) -> dict[str, Any]:
        """The operator says "this part is good": its features join the gallery as a new
        version, swapped in without disturbing requests in flight."""
        worker = self._admit()
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        items: list[tuple[bytes, str, Any]] = []  # (bytes, source name, what to report)
        for rid in ids or []:
            p, _ = self.image_file(int(rid))
            items.append((p.read_bytes(), f"spade-serve/result-{rid}{p.suffix}", rid))
        if image is not None:
            check_label("part_id", part_id)
            name = f"spade-serve/upload-{utc_now()}" + (f"-{part_id}" if part_id else "")
            items.append((image, name, part_id or "upload"))
        if not items:
            raise InputError('give "ids" of archived results or an image body')
        async with self._lock():
            act = worker.active
            base = act.detector.gallery
            sources = [
                {"name": name, "sha256": hashlib.sha256(data).hexdigest()}
                for data, name, _ in items
            ]
            dups = dict(duplicate_indices(base.sources, sources))
            skipped = [
                {"item": items[i][2], "reason": f"same content as {dups[i]}"} for i in sorted(dups)
            ]
            todo = [i for i in range(len(items)) if i not in dups]
            if not todo:
                raise ConflictError(
                    "nothing to add: " + "; ".join(f"{s['item']}: {s['reason']}" for s in skipped)
                )
            contract = act.detector.contract
            preps = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        self._pool,
                        prepare_bytes,
                        items[i][0],
                        contract,
                        items[i][1],
                        ACCEPTED_FORMATS,
                    )
                    for i in todo
                )
            )
            feats = await asyncio.gather(
                *(self._device(worker, p, "features", self.config.timeout_s) for p in preps)
            )
            pooled = np.concatenate([np.asarray(f.pooled) for f in feats])
            levels = [
                np.concatenate([np.asarray(f.levels[i]) for f in feats])
                for i in range(len(contract.levels))
            ]
            added = [items[i][2] for i in todo]
            v = await asyncio.to_thread(
                self.galleries.add_normal,
                base,
                act.version,
                pooled,
                levels,
                [sources[i] for i in todo],
                added,
                recalibrate,
            )
            try:
                det = await asyncio.to_thread(self._detector, v.path)
            except BaseException:
                self.galleries.set_current(act.version)  # keep serving and recording the old
                raise
            worker.swap(Active(v.version, det))
            self._set_gallery_metrics(v)
            self.metrics.gallery_updates.inc()
        return {
            "version": v.version,
            "n_images": v.n_images,
            "added": added,
            "skipped": skipped,
            "recalibrated": recalibrate,
            "thresholds": v.thresholds,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    async def rollback(self, version: int) -> dict[str, Any]:
        """Serve an earlier (or later) recorded version again."""
        worker = self._admit()
        async with self._lock():
            v = self.galleries.get(version)
            if v.version != worker.active.version:
                det = await asyncio.to_thread(self._detector, v.path)
                self.galleries.set_current(v.version)
                worker.swap(Active(v.version, det))
                self._set_gallery_metrics(v)
                self.metrics.gallery_updates.inc()
        return {"version": v.version, "n_images": v.n_images, "thresholds": v.thresholds}


__all__ = ["MEDIA_TYPES", "InspectionService", "check_label", "sniff_ext"]
