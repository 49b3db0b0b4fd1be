"""Python API for embedding spade-edge in an inspection device.

    det = Detector.load("model.onnx", "gallery.bin")      # once
    res = det.predict(image)                              # per part: path, PIL image or array
    res.score, res.is_anomalous, res.anomaly_map          # map in crop geometry (S x S)
    res.full_map()                                        # map projected onto the original image

Arrays: uint8 is 0-255, uint16 0-65535, float 0-1; ``predict(a, white=4095)`` for other ranges.
Out-of-range or non-finite values raise InputError (docs/reliability.md): nothing is guessed.

Thread safety: ``predict`` may be called from several threads. Backends that are thread-safe
(ONNX Runtime CPU + NumPy matcher) run concurrently; others (TensorRT, CUDA matcher: one stream
and one workspace each) are serialised by an internal lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image

from spade_edge.runtime.compat import check_gallery
from spade_edge.runtime.errors import InputError, SpadeError
from spade_edge.runtime.gallery import Gallery
from spade_edge.runtime.matchers import open_matcher
from spade_edge.runtime.matchers.base import DEFAULT_SIGMA, Score
from spade_edge.runtime.preprocess import (
    Geometry,
    Prepared,
    prepare_any,
    prepare_path,
    read_ahead,
)
from spade_edge.runtime.records import path_fields
from spade_edge.runtime.runners import Runner, open_runner
from spade_edge.runtime.thresholds import thresholds_problem

log = logging.getLogger(__name__)


@dataclass
class Result:
    """Outcome for one image."""

    score: float
    is_anomalous: bool | None  # None when no threshold is known
    anomaly_map: np.ndarray  # float32 [S, S], crop geometry
    threshold: float | None
    pixel_threshold: float | None
    geometry: Geometry
    neighbors: np.ndarray
    source: str = "<image>"
    rgb: np.ndarray | None = field(default=None, repr=False)

    def full_map(self) -> np.ndarray:
        """The map on the (EXIF-upright) original's grid, 0 outside the inspected crop.

        The grid is ``geometry.display_size``: the original size, or for images above
        ``preprocess.DISPLAY_MAX_PIXELS`` the original scaled down to fit (bounded memory).
        """
        return project_to_original(self.anomaly_map, self.geometry)

    def defect_mask(self) -> np.ndarray | None:
        """Binary mask on the ``full_map`` grid (map >= pixel threshold), or None without one."""
        if self.pixel_threshold is None:
            return None
        return self.full_map() >= self.pixel_threshold

    def to_record(self) -> dict[str, Any]:
        """JSON-friendly summary (what spade-run prints per image); see ``records``.

        ``image`` is UTF-8 text; a name that is not UTF-8 also gets ``image_b64`` (its bytes).
        """
        m = self.anomaly_map
        rec: dict[str, Any] = {
            **path_fields(self.source),
            "score": round(float(self.score), 6),
            "threshold": self.threshold,
            "anomalous": self.is_anomalous,
            "map_max": round(float(m.max()), 6),
        }
        if self.pixel_threshold is not None:
            rec["pixel_threshold"] = self.pixel_threshold
            rec["defect_fraction"] = round(float((m >= self.pixel_threshold).mean()), 6)
        return rec


def project_to_original(amap: np.ndarray, geo: Geometry) -> np.ndarray:
    """Undo centre-crop and resize: place the crop in the resized frame, resize to the
    original's grid (``geo.display_size``: bounded, see ``Result.full_map``)."""
    canvas = np.zeros((geo.resized_height, geo.resized_width), dtype=np.float32)
    canvas[geo.top : geo.top + geo.size, geo.left : geo.left + geo.size] = amap
    size = geo.display_size
    if (geo.resized_width, geo.resized_height) == size:
        return canvas
    im = Image.fromarray(canvas, mode="F").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.float32)


class Detector:
    """Model + gallery + matcher, loaded once; ``predict`` per image."""

    def __init__(
        self,
        runner: Runner,
        gallery: Any,
        matcher: Any,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
    ) -> None:
        self.runner = runner
        self.gallery = gallery
        self.matcher = matcher
        self.contract = runner.contract
        th = gallery.thresholds or {}
        same_k = (
            th.get("k_image", matcher.k_image) == matcher.k_image
            and th.get("k_gallery", matcher.k_gallery) == matcher.k_gallery
        )
        usable = same_k
        self.threshold = (
            threshold if threshold is not None else (th.get("image") if usable else None)
        )
        self.pixel_threshold = (
            pixel_threshold
            if pixel_threshold is not None
            else (th.get("pixel") if usable else None)
        )
        self.thresholds_stale = bool(th) and not usable and threshold is None
        #: why the stored thresholds (still applied) may not describe this gallery, e.g. images
        #: were added after calibration; None when they do. Logged once here.
        self.thresholds_warning: str | None = thresholds_problem(gallery) if usable else None
        if self.thresholds_warning and threshold is None:
            log.warning("%s: %s", getattr(gallery, "path", "gallery"), self.thresholds_warning)
        safe = runner.thread_safe and matcher.thread_safe
        self._lock: threading.Lock | None = None if safe else threading.Lock()

    @classmethod
    def load(
        cls,
        model: str | Path,
        gallery: str | Path,
        backend: str = "auto",
        matcher: str = "numpy",
        k_image: int | None = None,
        k_gallery: int | None = None,
        sigma: float = DEFAULT_SIGMA,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        verify: bool = True,
        runner_options: dict[str, Any] | None = None,
        matcher_options: dict[str, Any] | None = None,
    ) -> Detector:
        """Open model and gallery, check they belong together, build the matcher.

        ``verify`` (default) checks every gallery blob's SHA-256 and that every stored value is
        finite before anything is scored, once per load (its measured cost:
        docs/reliability.md); pass False to skip it knowingly.
        ``runner_options``/``matcher_options`` go to the backends (e.g. ``device`` for a GPU)."""
        g = Gallery.open(gallery, verify=verify)
        try:
            runner = open_runner(model, backend, **(runner_options or {}))
        except BaseException:
            g.close()
            raise
        try:
            check_gallery(g, runner, str(model))
            k_i = k_image if k_image is not None else g.default_k
            k_g = k_gallery if k_gallery is not None else g.default_k
            try:
                m = open_matcher(
                    g, matcher, k_image=k_i, k_gallery=k_g, sigma=sigma, **(matcher_options or {})
                )
            except SpadeError as e:
                raise type(e)(f"{g.path}: {e}") from None
        except Exception:
            runner.close()
            g.close()
            raise
        return cls(runner, g, m, threshold, pixel_threshold)

    # -- inference -------------------------------------------------------------------------
    def _finish(self, prep: Prepared, s: Score) -> Result:
        thr = self.threshold
        return Result(
            score=s.image_score,
            is_anomalous=None if thr is None else bool(s.image_score >= thr),
            anomaly_map=s.anomaly_map,
            threshold=thr,
            pixel_threshold=self.pixel_threshold,
            geometry=prep.geometry,
            neighbors=s.neighbors,
            source=prep.source,
            rgb=prep.rgb,
        )

    def _score_prepared(self, preps: list[Prepared]) -> list[Result]:
        return self.score_prepared(preps)

    def score_prepared(
        self, preps: list[Prepared], timings: dict[str, float] | None = None
    ) -> list[Result]:
        """Score decoded images as one batch (for callers that decode and batch themselves,
        like spade-serve). ``timings`` receives the seconds of ``infer`` and ``match``."""
        batch = np.stack([p.tensor for p in preps])
        if not np.isfinite(batch).all():  # preprocessing refuses these; never let one through
            bad = [p.source for p in preps if not np.isfinite(p.tensor).all()]
            raise InputError(f"{', '.join(bad)}: non-finite model input (NaN or infinity)")
        with contextlib.nullcontext() if self._lock is None else self._lock:
            t0 = time.perf_counter()
            feats = self.runner.infer(batch)
            t1 = time.perf_counter()
            scores = self.matcher.score(feats)
            t2 = time.perf_counter()
        if timings is not None:
            timings["infer"] = t1 - t0
            timings["match"] = t2 - t1
        return [self._finish(p, s) for p, s in zip(preps, scores, strict=True)]

    def predict(self, image: Any, white: float | None = None) -> Result:
        """Score one image: a path, a PIL image or a NumPy array.

        Arrays: HxW, HxWx1, HxWx3 or HxWx4 (alpha dropped). ``white`` is the value of a white
        pixel (defaults: uint8 255, uint16 65535, float 1.0; required for other integer
        types); values outside [0, white] and NaN/infinity raise InputError.
        """
        return self._score_prepared([prepare_any(image, self.contract, white=white)])[0]

    def _score_batch(self, items: list[Prepared]) -> list[Result | SpadeError]:
        """Score a batch; when it fails, score its images one by one so only the culprit fails."""
        try:
            return list(self._score_prepared(items))
        except SpadeError as e:
            if len(items) == 1:
                return [e]
        out: list[Result | SpadeError] = []
        for p in items:
            try:
                out.append(self._score_prepared([p])[0])
            except SpadeError as e:
                out.append(e)
        return out

    def predict_paths(
        self, paths: Iterable[Path], batch_size: int = 1, workers: int = 2
    ) -> Iterator[tuple[Path, Result | SpadeError]]:
        """Score files in order; decode runs a bounded window ahead in threads.

        A file that cannot be read or scored yields its own error and the others go on
        (per-image isolation, docs/reliability.md).
        """
        paths = list(paths)
        max_b = getattr(self.runner, "max_batch", None) or batch_size
        bs = max(1, min(batch_size, max_b))

        def load(p: Path) -> Prepared | SpadeError:
            try:
                return prepare_path(p, self.contract)
            except SpadeError as e:
                return e

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            ahead = read_ahead(paths, load, pool, window=2 * bs + workers)
            try:
                while items := [(p, fut.result()) for p, fut in islice(ahead, bs)]:
                    # placeholders: every Prepared is replaced by its Result below
                    out = cast(list[Result | SpadeError], [r for _, r in items])
                    good = [i for i, (_, r) in enumerate(items) if isinstance(r, Prepared)]
                    preps = [r for _, r in items if isinstance(r, Prepared)]
                    if preps:
                        for i, res in zip(good, self._score_batch(preps), strict=True):
                            out[i] = res
                    yield from zip((p for p, _ in items), out, strict=True)
            finally:
                ahead.close()  # cancel decodes not yet started when the caller stops early

    def close(self) -> None:
        self.matcher.close()
        self.runner.close()
        close_gallery = getattr(self.gallery, "close", None)
        if close_gallery is not None:
            close_gallery()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Detector", "InputError", "Result", "project_to_original"]
