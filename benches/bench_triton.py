"""Triton (model `spade`, Python backend) vs spade-serve vs spade-run on the same images.

Throughput and p50/p99 latency at 1, 4 and 16 concurrent clients (gRPC for Triton, HTTP for
spade-serve), with 1 and 2 Triton instances; spade-run on the same files; the remote-backbone
path (`triton` runner: backbone on the server, matcher here) at 1 client; the time for the
server to load a new gallery version. Everything on 127.0.0.1, loops bounded.

Runs in the numpy-1.26 venv (nvidia-pytriton pins numpy<2), e.g.:

    .venv-np126/bin/python benches/bench_triton.py --model artifacts/lite0.onnx \\
        --train ../shared/data/mvtec_ad/bottle/train/good \\
        --images ../shared/data/mvtec_ad/bottle/test --n 40 --json bench_triton.json

Timings on a shared machine are noisy: compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def drive(
    make_client: Callable[[], Any],
    call: Callable[[Any, bytes], Any],
    images: list[bytes],
    clients: int,
    requests: int,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """``clients`` threads send ``requests`` images in total (round robin over ``images``)."""
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + timeout_s

    def worker() -> None:
        c = make_client()
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    call(c, images[i % len(images)])
                except Exception as e:
                    errors.append(repr(e)[:200])
                    continue
                with lock:
                    lat.append(time.perf_counter() - t0)
        finally:
            with contextlib.suppress(Exception):
                c.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": len(errors),
        "images_per_s": round(len(lat) / wall, 2),
        "p50_ms": round(1000 * percentile(lat, 50), 1) if lat else None,
        "p99_ms": round(1000 * percentile(lat, 99), 1) if lat else None,
    }


def bench_triton(
    model: Path, gallery: Path, gallery2: Path, images: list[bytes], args: argparse.Namespace
) -> list[dict[str, Any]]:
    from spade_edge.runtime.runners.triton import TritonInspector
    from spade_edge.triton.repository import RepoOptions, write_repository
    from spade_edge.triton.server import LocalTritonServer, load_model

    rows = []
    for n_inst in args.instances:
        with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
            repo = Path(tmp) / "repo"
            opts = RepoOptions(instances=n_inst, max_batch_size=8, backbone=n_inst == 1)
            write_repository(model, gallery, repo, opts)
            models = ("spade", "spade_backbone") if n_inst == 1 else ("spade",)
            t0 = time.perf_counter()
            with LocalTritonServer(repo, models=models) as srv:
                start_s = time.perf_counter() - t0
                url = srv.grpc_url

                def call(c: Any, b: bytes) -> Any:
                    return c.inspect([b])

                drive(lambda url=url: TritonInspector(url), call, images, 2, 4)  # warm-up
                for c in args.clients:
                    r = drive(lambda url=url: TritonInspector(url), call, images, c, _n(args, c))
                    rows.append({"system": f"triton spade, {n_inst} instance(s)", **r})
                    print(json.dumps(rows[-1], allow_nan=False), flush=True)
                if n_inst == 1:
                    rows.append(_remote_backbone(srv.grpc_url, gallery, images, args))
                    print(json.dumps(rows[-1], allow_nan=False), flush=True)
                write_repository(model, gallery2, repo, opts)
                load_s = load_model(srv.http_url, "spade")
                rows.append(
                    {
                        "system": f"triton gallery v2 load, {n_inst} instance(s)",
                        "load_s": round(load_s, 2),
                        "server_start_s": round(start_s, 2),
                    }
                )
                print(json.dumps(rows[-1], allow_nan=False), flush=True)
    return rows


def _n(args: argparse.Namespace, clients: int) -> int:
    return max(args.requests, 3 * clients)


def _remote_backbone(
    url: str, gallery: Path, images: list[bytes], args: argparse.Namespace
) -> dict[str, Any]:
    """The `triton` runner: backbone on the server, features over gRPC, matcher here."""
    from spade_edge.runtime.detector import Detector
    from spade_edge.runtime.preprocess import prepare_bytes

    with Detector.load(
        "spade_backbone", gallery, backend="triton", runner_options={"url": url}
    ) as det:
        feat_bytes = 4 * (
            sum(lv.height * lv.width * lv.channels for lv in det.contract.levels)
            + det.contract.pooled_dim
        )

        class _C:
            def close(self) -> None:
                pass

        def call(_: Any, b: bytes) -> Any:
            return det.score_prepared([prepare_bytes(b, det.contract, "img")])

        r = drive(_C, call, images, 1, args.requests)
    return {
        "system": "triton runner (backbone remote, matcher local)",
        **r,
        "feature_bytes_per_image": feat_bytes,
    }


@contextlib.contextmanager
def serve_process(model: Path, gallery: Path, archive: Path) -> Iterator[str]:
    """spade-serve (its CLI) on a free loopback port; stopped with SIGTERM whatever happens."""
    from spade_edge.triton.server import free_port

    port = free_port()
    argv = [sys.executable, "-m", "spade_edge.cli.serve", str(model), str(gallery)]
    argv += ["--port", str(port), "--archive", str(archive), "--keep-images", "none"]
    log = archive.with_name("serve.log").open("wb")  # a file: a pipe nobody reads fills up
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                err = archive.with_name("serve.log").read_text(errors="replace")
                raise RuntimeError(f"spade-serve exited {proc.returncode}: {err[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("spade-serve not ready after 180 s")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        log.close()


def bench_serve(
    model: Path, gallery: Path, images: list[bytes], args: argparse.Namespace
) -> list[dict[str, Any]]:
    import httpx

    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp,
        serve_process(model, gallery, Path(tmp) / "archive") as url,
    ):

        def make() -> Any:
            return httpx.Client(base_url=url, timeout=120)

        def call(c: Any, b: bytes) -> Any:
            r = c.post("/v1/inspect", content=b, headers={"Content-Type": "image/png"})
            r.raise_for_status()
            return r

        drive(make, call, images, 2, 4)  # warm-up
        for c in args.clients:
            r = drive(make, call, images, c, _n(args, c))
            rows.append({"system": "spade-serve", **r})
            print(json.dumps(rows[-1], allow_nan=False), flush=True)
    return rows


def bench_run(model: Path, gallery: Path, files: list[Path]) -> list[dict[str, Any]]:
    """spade-run on the same files: the process (start-up included) and its scoring loop."""
    from spade_edge.runtime.detector import Detector

    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        folder = Path(tmp) / "imgs"
        folder.mkdir()
        for i, f in enumerate(files):
            (folder / f"{i:04d}{f.suffix}").symlink_to(f.resolve())
        exe = Path(sys.executable).with_name("spade-run")
        cmd = [str(exe), str(model), str(gallery), str(folder), "--json", str(Path(tmp) / "o")]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
    rows = [
        {
            "system": "spade-run (process, start-up included)",
            "clients": 1,
            "requests": len(files),
            "images_per_s": round(len(files) / wall, 2),
        }
    ]
    with Detector.load(model, gallery) as det:
        det.predict(files[0])
        lat = []
        t0 = time.perf_counter()
        for f in files:
            t1 = time.perf_counter()
            det.predict(f)
            lat.append(time.perf_counter() - t1)
        wall = time.perf_counter() - t0
    rows.append(
        {
            "system": "Detector in-process (spade-run's loop)",
            "clients": 1,
            "requests": len(files),
            "images_per_s": round(len(files) / wall, 2),
            "p50_ms": round(1000 * percentile(lat, 50), 1),
            "p99_ms": round(1000 * percentile(lat, 99), 1),
        }
    )
    for r in rows:
        print(json.dumps(r, allow_nan=False), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| system | clients | requests | errors | images/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "load_s" in r:
            continue
        out.append(
            f"| {r['system']} | {r.get('clients', '')} | {r.get('requests', '')} | "
            f"{r.get('errors', 0)} | {r.get('images_per_s', '')} | {r.get('p50_ms', '')} | "
            f"{r.get('p99_ms', '')} |"
        )
    for r in rows:
        if "load_s" in r:
            out.append(f"\n{r['system']}: {r['load_s']} s (server start {r['server_start_s']} s)")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="spade-edge ONNX model")
    ap.add_argument("--train", type=Path, required=True, help="normal images for the gallery")
    ap.add_argument("--images", type=Path, required=True, help="test images (folder)")
    ap.add_argument("--n", type=int, default=40, help="test images used (bounded)")
    ap.add_argument("--n-train", type=int, default=60, help="gallery images (bounded)")
    ap.add_argument("--requests", type=int, default=40, help="requests per row (min 3/client)")
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--instances", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    ap.add_argument("--skip", default="", help="comma list of: serve, run")
    ap.add_argument("--json", type=Path, help="write all rows here")
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    from spade_edge.runtime.packer import pack

    def listing(p: Path) -> list[Path]:
        return sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)

    train = listing(args.train)[: args.n_train]
    files = listing(args.images)
    files = files[:: max(1, len(files) // args.n)][: args.n]
    images = [f.read_bytes() for f in files]
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="bench-g-") as tmp:
        g1, g2 = Path(tmp) / "g1.bin", Path(tmp) / "g2.bin"
        pack(args.model, train, g1, progress=False)
        pack(args.model, train[: max(10, len(train) * 3 // 4)], g2, progress=False)
        rows = bench_triton(args.model, g1, g2, images, args)
        if "serve" not in skip:
            rows += bench_serve(args.model, g1, images, args)
        if "run" not in skip:
            rows += bench_run(args.model, g1, files)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, allow_nan=False))


if __name__ == "__main__":
    main()
