"""One inference worker per device, fed by a bounded queue, micro-batching what arrives together.

The worker thread is the only user of the runner and matcher (GPU backends are one stream), so
the model needs no locks. A batch starts with the first waiting job and takes whatever else
arrives within ``max_wait`` seconds, up to ``max_batch`` (and the runner's own limit); it does
not wait when the queue is empty and ``more_coming()`` says no request is being decoded. The
gallery (matcher + thresholds) is read once per batch from ``active``: swapping in a new
version is a reference assignment, the batch in progress finishes on the old one, and the old
one is closed by this thread at the start of the next batch. Nothing in flight is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spade_edge.runtime.detector import Detector, Result
from spade_edge.runtime.preprocess import Prepared
from spade_edge.runtime.runners.base import Features
from spade_edge.serve.errors import NotReadyError, OverloadedError

log = logging.getLogger(__name__)


@dataclass
class Active:
    """The gallery version being served: its detector (shared runner) and version number."""

    version: int
    detector: Detector


@dataclass
class Job:
    """One image waiting for the device. ``kind``: "score" (verdict) or "features" (gallery)."""

    prep: Prepared
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    kind: str = "score"
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False


@dataclass
class Scored:
    """What the worker hands back for a "score" job."""

    result: Result
    version: int
    queue_s: float
    infer_s: float
    match_s: float
    batch_size: int


class InferenceWorker:
    """The device's single consumer thread (see module docstring)."""

    def __init__(
        self,
        active: Active,
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        queue_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
        more_coming: Callable[[], bool] | None = None,
    ) -> None:
        self.active = active
        runner_max = getattr(active.detector.runner, "max_batch", None)
        self.max_batch = max(1, min(max_batch, runner_max) if runner_max else max_batch)
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._retired: list[Active] = []
        self._lock = threading.Lock()
        self._carry: Job | None = None
        self._on_batch = on_batch
        self._more_coming = more_coming or (lambda: True)
        self._thread = threading.Thread(target=self._run, name="spade-infer", daemon=True)
        self._stopping = False
        self._stop_seen = False
        self._thread.start()

    # -- producer side (event loop) --
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        """Queue a job without blocking; a full queue is ``OverloadedError`` (503 upstream)."""
        if self._stopping:
            raise NotReadyError("server is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise OverloadedError(f"inference queue full ({self._queue.maxsize} waiting)") from None

    def swap(self, new: Active) -> Active:
        """Serve ``new`` from the next batch on; the old one is closed by the worker later."""
        with self._lock:
            old, self.active = self.active, new
            self._retired.append(old)
        return old

    def stop(self, timeout: float = 60.0) -> None:
        """Finish every queued job, then end the thread (closes retired galleries)."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        while True:  # the queue may be full: wait for room for the sentinel
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                if time.monotonic() > deadline or not self._thread.is_alive():
                    break
        self._thread.join(max(0.0, deadline - time.monotonic()))

    # -- consumer side (worker thread) --
    def _next(self, timeout: float | None) -> Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        if timeout is None:
            return self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait()
        return self._queue.get(timeout=timeout)

    def _collect(self, first: Job) -> list[Job]:
        """``first`` plus jobs of the same kind arriving within max_wait, up to max_batch."""
        batch = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            if self._queue.empty() and self._carry is None and not self._more_coming():
                break  # nobody else is on the way: waiting would only add latency
            try:
                job = self._next(min(remaining, 0.002))
            except queue.Empty:
                continue
            if job is None:
                self._stop_seen = True
                break
            if job.kind != first.kind:
                self._carry = job
                break
            batch.append(job)
        return batch

    def _run(self) -> None:
        while not self._stop_seen or self._carry is not None:
            first = self._next(None)
            if first is None:
                break
            batch = self._collect(first)
            with self._lock:
                act = self.active
                retired, self._retired = self._retired, []
            for old in retired:
                _close_gallery(old)
            live = [j for j in batch if not j.cancelled and not j.future.done()]
            if not live:
                continue
            if self._on_batch is not None:
                self._on_batch(len(live))
            try:
                self._process(act, live)
            except BaseException as e:  # never kill the worker: fail the jobs instead
                log.exception("inference batch failed")
                for j in live:
                    _resolve(j, exc=e)
        with self._lock:
            retired, self._retired = self._retired, []
        for old in retired:
            _close_gallery(old)

    def _process(self, act: Active, jobs: list[Job]) -> None:
        start = time.perf_counter()
        det = act.detector
        if jobs[0].kind == "features":
            feats = det.runner.infer(np.stack([j.prep.tensor for j in jobs])).to_host()
            for i, j in enumerate(jobs):
                _resolve(j, value=feats.image(i))
            return
        timings: dict[str, float] = {}
        try:
            results = det.score_prepared([j.prep for j in jobs], timings)
        except Exception:
            if len(jobs) == 1:
                raise
            for j in jobs:  # one bad image must not fail its batch-mates
                try:
                    self._process(act, [j])
                except Exception as e:
                    _resolve(j, exc=e)
            return
        for j, r in zip(jobs, results, strict=True):
            _resolve(
                j,
                value=Scored(
                    result=r,
                    version=act.version,
                    queue_s=start - j.enqueued,
                    infer_s=timings.get("infer", 0.0),
                    match_s=timings.get("match", 0.0),
                    batch_size=len(jobs),
                ),
            )


def _resolve(job: Job, value: Any = None, exc: BaseException | None = None) -> None:
    def done() -> None:
        if job.future.done():
            return
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(value)

    with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
        job.loop.call_soon_threadsafe(done)


def _close_gallery(act: Active) -> None:
    """Close a retired version's matcher and gallery (the runner is shared, it stays)."""
    with contextlib.suppress(Exception):
        act.detector.matcher.close()
    with contextlib.suppress(Exception):
        act.detector.gallery.close()


__all__ = ["Active", "Features", "InferenceWorker", "Job", "Scored"]
