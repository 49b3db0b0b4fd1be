"""spade-serve under load on loopback: throughput, latency, batching, lost ids, RSS soak.

    python benches/bench_serve.py MODEL GALLERY IMAGES... [--clients 1,4,16] [--rounds 2]
        [--compare-run] [--soak 10000] [--gallery-update IMAGE] [--json out.json]

Starts a real ``spade-serve`` on a free 127.0.0.1 port (a fresh archive in a temp folder),
posts the images from N concurrent clients (each request loop bounded in count and time),
and prints throughput, p50/p99 latency, the micro-batch size distribution (from /metrics) and
lost or duplicated ids (must be 0: every 200 must carry a unique id that the archive holds with
the right part id). ``--compare-run`` scores the same images with the library path spade-run
uses (``Detector.predict_paths``, batch 1) in this process, in the same run, so the ratio is
meaningful on a shared machine. ``--soak N`` sends N requests and samples the server's RSS.
``--gallery-update IMAGE`` times POST /v1/gallery/normal until the new version serves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from spade_edge.runtime.detector import Detector
from spade_edge.runtime.preprocess import list_images
from spade_edge_testing.serve_process import ServeNotReadyError, wait_ready
from spade_edge_testing.station_helpers import free_port  # loopback only

TOKEN = "bench-token-0123456789"


class Server:
    """A spade-serve subprocess on loopback, always stopped (SIGTERM, then SIGKILL)."""

    def __init__(self, model: Path, gallery: Path, archive: Path, extra: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        token = archive.parent / "token"
        token.write_text(TOKEN)
        exe = Path(sys.executable).with_name("spade-serve")
        argv = [str(exe), str(model), str(gallery), "--port", str(self.port)]
        argv += ["--archive", str(archive), "--token-file", str(token), "--log-level", "warning"]
        self.proc = subprocess.Popen([*argv, *extra], stderr=subprocess.DEVNULL)
        try:
            wait_ready(self.url, self.proc, timeout=300, step=0.2)
        except ServeNotReadyError as e:
            self.stop()
            raise SystemExit(str(e)) from None

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def batch_histogram(url: str) -> dict[str, float]:
    """Cumulative spade_batch_size buckets (le -> count) from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "spade_batch_size":
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    out[s.labels["le"]] = s.value
    return out


def batch_distribution(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Batches per size bucket between two scrapes (non-cumulative)."""
    les = [*sorted((k for k in after if k != "+Inf"), key=float), "+Inf"]
    out, prev = {}, 0.0
    for le in les:
        cum = after.get(le, 0.0) - before.get(le, 0.0)
        if cum - prev:
            out[f"<={le}"] = int(cum - prev)
        prev = cum
    return out


def load(
    url: str,
    images: list[bytes],
    clients: int,
    total: int,
    tag: str,
    time_limit: float = 1800.0,
    on_done: Any = None,
) -> dict[str, Any]:
    """``total`` requests from ``clients`` threads (image i -> request i % len)."""
    lat: list[float] = []
    ids: list[int] = []
    sent: dict[str, int] = {}
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(total))
    stop_at = time.monotonic() + time_limit

    def worker() -> None:
        with httpx.Client(timeout=120) as c:
            for _ in range(total):  # bounded: at most `total` iterations per client
                with lock:
                    i = next(counter, None)
                if i is None or time.monotonic() > stop_at:
                    return
                part = f"{tag}-{i}"
                t0 = time.perf_counter()
                try:
                    r = c.post(
                        f"{url}/v1/inspect",
                        content=images[i % len(images)],
                        params={"part_id": part},
                        headers={"content-type": "application/octet-stream"},
                    )
                except httpx.HTTPError as e:
                    with lock:
                        failures.append(f"{part}: {type(e).__name__}")
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        lat.append(dt)
                        rid = r.json()["id"]
                        ids.append(rid)
                        sent[part] = rid
                    else:
                        failures.append(f"{part}: {r.status_code}")
                    if on_done is not None:
                        on_done(len(lat))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    # every acknowledged id must be in the archive with its own part id
    archived: dict[int, str] = {}
    since = min(ids) - 1 if ids else 0
    for _ in range(total // 1000 + 2):
        page = httpx.get(
            f"{url}/v1/results", params={"since_id": since, "limit": 1000}, timeout=60
        ).json()["results"]
        if not page:
            break
        archived.update({r["id"]: r["part_id"] for r in page})
        since = page[-1]["id"]
    missing = [p for p, rid in sent.items() if archived.get(rid) != p]
    a = np.array(lat) * 1000.0
    return {
        "clients": clients,
        "requests": total,
        "ok": len(lat),
        "failed": len(failures),
        "lost": len(missing) + (total - len(lat) - len(failures)),
        "duplicated_ids": len(ids) - len(set(ids)),
        "seconds": round(wall, 3),
        "images_per_s": round(len(lat) / wall, 2) if wall > 0 else None,
        "p50_ms": round(float(np.percentile(a, 50)), 2) if len(a) else None,
        "p99_ms": round(float(np.percentile(a, 99)), 2) if len(a) else None,
        "failures": failures[:5],
    }


def spade_run_throughput(model: Path, gallery: Path, paths: list[Path], backend: str) -> dict:
    """What spade-run does per image (Detector.predict_paths, batch 1), timed after loading."""
    t0 = time.perf_counter()
    det = Detector.load(model, gallery, backend=backend)
    t_load = time.perf_counter() - t0
    with det:
        for _ in det.predict_paths(paths[:2]):  # warm-up
            pass
        t0 = time.perf_counter()
        n = sum(1 for _ in det.predict_paths(paths, batch_size=1))
        dt = time.perf_counter() - t0
    return {
        "images": n,
        "seconds": round(dt, 3),
        "images_per_s": round(n / dt, 2),
        "load_seconds": round(t_load, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("gallery", type=Path)
    ap.add_argument("images", nargs="+")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--rounds", type=int, default=1, help="passes over the images per count")
    ap.add_argument("--compare-run", action="store_true", help="also time the spade-run path")
    ap.add_argument("--soak", type=int, default=0, help="requests of the RSS soak (0: none)")
    ap.add_argument("--soak-clients", type=int, default=4)
    ap.add_argument("--gallery-update", type=Path, help="image to add (times the swap)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--serve-args", default="", help="extra spade-serve options, one string")
    ap.add_argument("--json", type=Path, help="write all figures here")
    a = ap.parse_args()

    paths = list_images([Path(x) for x in a.images])
    if not paths:
        raise SystemExit("no images")
    data = [p.read_bytes() for p in paths]
    report: dict[str, Any] = {
        "model": str(a.model),
        "gallery": str(a.gallery),
        "images": len(paths),
        "cpus": os.cpu_count(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    extra = ["--backend", a.backend, *a.serve_args.split()]
    srv = Server(a.model, a.gallery, tmp / "archive", extra)
    try:
        report["serve"] = []
        for c in [int(x) for x in a.clients.split(",") if x]:
            before = batch_histogram(srv.url)
            res = load(srv.url, data, c, a.rounds * len(data), f"c{c}")
            res["batch_sizes"] = batch_distribution(before, batch_histogram(srv.url))
            report["serve"].append(res)
            print(json.dumps(res, allow_nan=False), flush=True)
        if a.compare_run:
            report["spade_run"] = spade_run_throughput(a.model, a.gallery, paths, a.backend)
            print(json.dumps({"spade_run": report["spade_run"]}, allow_nan=False), flush=True)
        if a.gallery_update is not None:
            report["gallery_update"] = gallery_update(srv.url, a.gallery_update)
            print(
                json.dumps({"gallery_update": report["gallery_update"]}, allow_nan=False),
                flush=True,
            )
        if a.soak:
            report["soak"] = soak(srv, data, a.soak, a.soak_clients)
            print(
                json.dumps(
                    {"soak": {k: v for k, v in report["soak"].items() if k != "rss_series"}},
                    allow_nan=False,
                ),
                flush=True,
            )
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1, allow_nan=False))


def gallery_update(url: str, image: Path) -> dict[str, Any]:
    """POST an image as normal, then recalibrate with another: seconds until each serves."""
    out: dict[str, Any] = {}
    auth = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/octet-stream"}
    before = httpx.get(f"{url}/v1/gallery", timeout=10).json()
    out["n_images_before"] = before["n_images"]
    for key, params in (("keep_thresholds", {}), ("recalibrate", {"recalibrate": "true"})):
        body = image.read_bytes() if key == "keep_thresholds" else _variant(image)
        t0 = time.perf_counter()
        r = httpx.post(
            f"{url}/v1/gallery/normal", content=body, params=params, headers=auth, timeout=1800
        )
        t_post = time.perf_counter() - t0
        r.raise_for_status()
        v = r.json()["version"]
        res = httpx.post(f"{url}/v1/inspect", content=image.read_bytes(), timeout=60).json()
        t_serving = time.perf_counter() - t0
        assert res["gallery_version"] == v, (res["gallery_version"], v)
        out[key] = {
            "version": v,
            "post_seconds": round(t_post, 3),
            "until_serving_seconds": round(t_serving, 3),
            "n_images": r.json()["n_images"],
        }
    return out


def _variant(image: Path) -> bytes:
    """The image mirrored (different content, so it is not refused as a duplicate)."""
    import io

    from PIL import Image, ImageOps

    buf = io.BytesIO()
    ImageOps.mirror(Image.open(image)).save(buf, format="PNG")
    return buf.getvalue()


def soak(srv: Server, data: list[bytes], n: int, clients: int) -> dict[str, Any]:
    """``n`` requests; RSS sampled every 250 completions (warm-up: the first 10 %)."""
    series: list[tuple[int, float, float]] = []
    t0 = time.perf_counter()
    nxt = [0]

    def on_done(done: int) -> None:
        if done >= nxt[0]:
            nxt[0] += 250
            series.append((done, round(time.perf_counter() - t0, 1), round(srv.rss_mb(), 1)))

    res = load(srv.url, data, clients, n, "soak", time_limit=7200.0, on_done=on_done)
    series.append((res["ok"], round(time.perf_counter() - t0, 1), round(srv.rss_mb(), 1)))
    warm = [r for d, _, r in series if d >= n // 10]
    res["rss_after_warmup_mb"] = warm[0] if warm else None
    res["rss_end_mb"] = series[-1][2]
    res["rss_max_after_warmup_mb"] = max(warm) if warm else None
    res["rss_series"] = series
    return res


if __name__ == "__main__":
    main()
