"""Station figures for the report (issue 14), all on loopback, every loop bounded.

    .venv/bin/python benches/bench_station.py --model M.onnx --gallery G.bin [--files 200]
        [--interval 0] [--restart-parts 300] [--page-parts 50] [--json out.json]
        [--only watch|restart|page] [--screenshot docs/img/station.png]

1. watch folder -> verdict on MQTT: a real mosquitto, the spade-serve app with
   ``--source watch:DIR?settle=0`` (rename-in convention) and ``--sink mqtt://…``; each of
   ``--files`` part images is written as ``.NAME`` and renamed to ``NAME``, the next one once
   the previous verdict arrived (``--interval S``: every S seconds instead); latency = time the
   result arrives at an MQTT subscriber - time of the rename. p50/p99.
2. MQTT messages lost across a broker restart: ``--restart-parts`` parts posted over HTTP; the
   broker is stopped after a third of them and started again after two thirds; a persistent
   QoS 1 subscriber counts distinct result ids (lost = posted - received; duplicates counted).
3. Chromium (Playwright, Debian's chromium): page load (navigation start -> load event, and ->
   the page's first data drawn), and event-to-card: ``--page-parts`` parts posted one by one,
   card inserted in the DOM (MutationObserver, page clock) - POST answered (same machine clock).
The demo model (``spade-demo --out DIR``: Lite0 + a synthetic-part gallery) fits: --model
DIR/lite0.onnx --gallery DIR/gallery.bin. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spade_edge.export.demo import make_part
from spade_edge_testing.station_helpers import Mosquitto, need_binary  # loopback helpers
from spade_edge_testing.station_server import TOKEN, station_server  # of the station tests


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def part_png(rng: np.random.Generator, defect: bool) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_part(rng, defect=defect)).save(buf, format="PNG")
    return buf.getvalue()


class Arrivals:
    """A persistent QoS 1 subscriber recording the first arrival time of each result."""

    def __init__(self, port: int, topic: str, client_id: str) -> None:
        import paho.mqtt.client as mqtt

        self.first: dict[str, float] = {}
        self.service_ms: dict[str, float] = {}  # the service's own latency_ms.total
        self.ids: list[int] = []
        self.lock = threading.Lock()
        ok = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        c.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        c.on_connect = lambda cl, *a: (cl.subscribe(topic, qos=1), ok.set())
        c.on_message = self._on_message
        c.connect_async("127.0.0.1", port)
        c.loop_start()
        self.client = c
        if not ok.wait(10):
            raise RuntimeError("subscriber could not connect")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        if not msg.topic.endswith("/result"):
            return
        r = json.loads(msg.payload)
        with self.lock:
            self.ids.append(int(r["id"]))
            self.first.setdefault(str(r["part_id"]), now)
            self.service_ms.setdefault(str(r["part_id"]), float(r["latency_ms"]["total"]))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def bench_watch_mqtt(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    broker = Mosquitto(tmp / "broker")
    broker.start()
    watch = tmp / "in"
    watch.mkdir()
    rng = np.random.default_rng(0)
    images = [part_png(rng, defect=i % 10 == 9) for i in range(args.files)]
    landed: dict[str, float] = {}
    sub = None
    try:
        sub = Arrivals(broker.port, "plant/#", "bench-watch")
        with station_server(
            args.model,
            args.gallery,
            tmp / "archive",
            sources=[f"watch:{watch}?settle=0&poll=0.02"],
            sinks=[f"mqtt://127.0.0.1:{broker.port}/plant"],
            keep_images="anomalous",
        ):
            for i, data in enumerate(images):
                name = f"part_{i:04d}"
                (watch / f".{name}.png").write_bytes(data)
                os.replace(watch / f".{name}.png", watch / f"{name}.png")
                landed[name] = time.time()
                if args.interval > 0:  # open loop: a fixed arrival rate
                    time.sleep(args.interval)
                else:  # closed loop: the next part once this verdict is out (no queueing)
                    wait(lambda n=name: n in sub.first, 120)
                    time.sleep(0.05)
            wait(lambda: len(sub.first) >= len(landed), 120)
    finally:
        if sub is not None:
            sub.close()
        broker.stop()
    lat = [1000 * (sub.first[k] - t) for k, t in landed.items() if k in sub.first]
    # what the station adds around scoring: detection, read, archive lookup, move, MQTT
    extra = [
        1000 * (sub.first[k] - t) - sub.service_ms[k] for k, t in landed.items() if k in sub.first
    ]
    return {
        "files": len(landed),
        "received": len(lat),
        "p50_ms": round(pct(lat, 0.5), 1),
        "p99_ms": round(pct(lat, 0.99), 1),
        "mean_ms": round(statistics.fmean(lat), 1),
        "max_ms": round(max(lat), 1),
        "service_total_ms_p50": round(pct(list(sub.service_ms.values()), 0.5), 1),
        "outside_service_ms_p50": round(pct(extra, 0.5), 1),
        "outside_service_ms_p99": round(pct(extra, 0.99), 1),
        "interval_s": args.interval,
    }


def bench_restart(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import httpx

    broker = Mosquitto(tmp / "broker2")
    broker.start()
    rng = np.random.default_rng(1)
    images = [part_png(rng, defect=False) for _ in range(8)]
    posted: list[int] = []
    sub = None
    try:
        sub = Arrivals(broker.port, "plant/#", "bench-restart")
        with (
            station_server(
                args.model,
                args.gallery,
                tmp / "archive2",
                sinks=[f"mqtt://127.0.0.1:{broker.port}/plant?backoff_max=2"],
                keep_images="none",
            ) as (url, st),
            httpx.Client(timeout=30) as http,
        ):
            n = args.restart_parts
            for i in range(n):
                if i == n // 3:
                    broker.stop()
                if i == 2 * n // 3:
                    broker.start()
                r = http.post(
                    f"{url}/v1/inspect",
                    params={"part_id": f"r{i:04d}"},
                    content=images[i % len(images)],
                    headers={"Content-Type": "image/png"},
                )
                r.raise_for_status()
                posted.append(int(r.json()["id"]))
            wait(lambda: set(sub.ids) >= set(posted), 60)
            sink = st.sinks[0]
            stats = {"dropped_by_buffer": sink.dropped, "buffer": sink.capacity}
    finally:
        if sub is not None:
            sub.close()
        broker.stop()
    got = set(sub.ids)
    return {
        "posted": len(posted),
        "lost": len(set(posted) - got),
        "duplicates": len(sub.ids) - len(got),
        "down_for_parts": args.restart_parts // 3,
        **stats,
    }


def bench_page(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import httpx
    from playwright.sync_api import sync_playwright

    exe = need_binary("chromium", "chromium")
    rng = np.random.default_rng(2)
    images = [part_png(rng, defect=i % 5 == 4) for i in range(10)]
    with (
        station_server(args.model, args.gallery, tmp / "archive3") as (url, _),
        httpx.Client(timeout=30) as http,
        sync_playwright() as p,
    ):
        for i in range(args.history):  # a page with history, as on a line
            http.post(
                f"{url}/v1/inspect",
                params={"part_id": f"ring-{i:04d}"},
                content=images[i % 10],
                headers={"Content-Type": "image/png"},
            )
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        # the page's CSP forbids eval; Playwright's polling predicates need it (bench only)
        ctx = b.new_context(viewport={"width": 1366, "height": 768}, bypass_csp=True)
        try:
            loads, ready = [], []
            for _ in range(5):
                page = ctx.new_page()
                page.goto(url + "/")
                page.wait_for_selector("body[data-ready='1']", timeout=20_000)
                page.wait_for_function(
                    "() => performance.getEntriesByType('navigation')[0].loadEventEnd > 0"
                )
                loads.append(
                    page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
                )
                ready.append(
                    page.evaluate("performance.getEntriesByName('station-ready')[0].startTime")
                )
                page.close()
            page = ctx.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#conn.up", timeout=20_000)
            page.evaluate(
                "window.__cards = {}; new MutationObserver((ms) => { for (const m of ms)"
                " for (const n of m.addedNodes) if (n.dataset && n.dataset.id)"
                " window.__cards[n.dataset.id] = Date.now(); })"
                ".observe(document.getElementById('cards'), {childList: true});"
            )
            e2c = []
            for i in range(args.page_parts):
                r = http.post(
                    f"{url}/v1/inspect",
                    params={"part_id": f"ring-{args.history + i:04d}"},
                    content=images[i % 10],
                    headers={"Content-Type": "image/png"},
                )
                t_answer = time.time() * 1000
                rid = str(r.json()["id"])
                page.wait_for_function(f"() => window.__cards['{rid}'] !== undefined", timeout=5000)
                e2c.append(page.evaluate(f"window.__cards['{rid}']") - t_answer)
                time.sleep(0.05)
            if args.screenshot is not None:  # demo parts only: safe to publish
                page.set_viewport_size({"width": 1366, "height": 768})
                page.evaluate("window.scrollTo(0, 0)")
                page.wait_for_timeout(500)
                args.screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.screenshot))
            page.close()
        finally:
            b.close()
    return {
        "page_load_ms_median": round(statistics.median(loads), 1),
        "page_ready_ms_median": round(statistics.median(ready), 1),
        "event_to_card_ms_p50": round(pct(e2c, 0.5), 1),
        "event_to_card_ms_p99": round(pct(e2c, 0.99), 1),
        "event_to_card_ms_max": round(max(e2c), 1),
        "parts": len(e2c),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--gallery", type=Path, required=True)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--interval", type=float, default=0.0, help="0: closed loop")
    ap.add_argument("--restart-parts", type=int, default=300)
    ap.add_argument("--page-parts", type=int, default=50)
    ap.add_argument("--history", type=int, default=20, help="parts posted before the page opens")
    ap.add_argument("--only", choices=["watch", "restart", "page"], action="append")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--screenshot", type=Path, help="PNG of the page after the page bench")
    args = ap.parse_args()
    out: dict[str, Any] = {"model": str(args.model), "cpus": os.cpu_count(), "token": bool(TOKEN)}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for key, name, fn in (
            ("watch", "watch_to_mqtt", bench_watch_mqtt),
            ("restart", "broker_restart", bench_restart),
            ("page", "page", bench_page),
        ):
            if args.only and key not in args.only:
                continue
            t0 = time.perf_counter()
            out[name] = fn(args, tmp)
            out[name]["bench_s"] = round(time.perf_counter() - t0, 1)
            print(name, json.dumps(out[name], allow_nan=False), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, allow_nan=False))


if __name__ == "__main__":
    main()
