"""Prometheus metrics of one service instance (its own registry: several apps per process work).

Latency per stage, verdict counters, queue depth, batch sizes, gallery version and size, and
quantiles of the recent normal scores: when those creep towards the threshold the line or the
camera has drifted, long before the reject rate says so.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

STAGES = ("queue", "decode", "infer", "match", "archive", "total")
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
RECENT_NORMAL = 1000  # scores kept for the drift quantiles
QUANTILES = (0.5, 0.9, 0.99)


class _RecentScores(Collector):
    """Quantiles of the last RECENT_NORMAL normal scores, computed at scrape time."""

    def __init__(self) -> None:
        self._scores: deque[float] = deque(maxlen=RECENT_NORMAL)
        self._lock = threading.Lock()

    def add(self, score: float) -> None:
        with self._lock:
            self._scores.append(score)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "spade_recent_normal_score",
            f"Quantiles of the image scores of the last {RECENT_NORMAL} normal parts (drift)",
            labels=["quantile"],
        )
        with self._lock:
            a = np.array(self._scores, dtype=np.float64)
        if len(a):
            for q in QUANTILES:
                g.add_metric([str(q)], float(np.quantile(a, q)))
        yield g


class Metrics:
    """All series of one service; ``render()`` is the /metrics body."""

    def __init__(self, queue_depth: Callable[[], int], in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "spade_stage_seconds",
            "Latency per stage of POST /v1/inspect (total excludes the archive commit)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.verdicts = Counter("spade_verdicts", "Archived verdicts", ["verdict"], registry=r)
        self.rejected = Counter(
            "spade_requests_rejected",
            "Requests answered with an error, by reason",
            ["reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "spade_batch_size",
            "Images per inference batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.queue_depth = Gauge("spade_queue_depth", "Jobs waiting for the device", registry=r)
        self.queue_depth.set_function(lambda: float(queue_depth()))
        self.in_flight = Gauge(
            "spade_in_flight", "Inspections admitted and not answered yet", registry=r
        )
        self.in_flight.set_function(lambda: float(in_flight()))
        self.gallery_version = Gauge(
            "spade_gallery_version", "Gallery version being served", registry=r
        )
        self.gallery_images = Gauge(
            "spade_gallery_images", "Normal images in the served gallery", registry=r
        )
        self.gallery_updates = Counter(
            "spade_gallery_updates", "Gallery versions swapped in (add or rollback)", registry=r
        )
        self.archive_bytes = Gauge(
            "spade_archive_file_bytes", "Bytes of image/map/overlay files kept", registry=r
        )
        self.recent = _RecentScores()
        r.register(self.recent)

    def observe(self, latency_s: dict[str, float], verdict: str, score: float) -> None:
        for stage, s in latency_s.items():
            self.latency.labels(stage).observe(s)
        self.verdicts.labels(verdict).inc()
        if verdict == "normal":
            self.recent.add(score)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["STAGES", "Metrics"]
