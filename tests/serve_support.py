"""Shared helpers of the spade-serve tests: a tiny model + calibrated gallery, images, and a
real ``spade-serve`` process on a free loopback port that is always stopped."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

K = 3  # the tiny gallery's default K (thresholds are calibrated for it)


def png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def normal_array(seed: int, size: tuple[int, int] = (40, 48)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.full((size[1], size[0], 3), 120, np.uint8)
    return base + rng.integers(0, 20, base.shape, dtype=np.uint8)


def defect_array(size: tuple[int, int] = (40, 48)) -> np.ndarray:
    a = normal_array(99, size)
    a[10:30, 8:30] = [250, 0, 0]
    return a


def make_gallery(model: Path, folder: Path, n: int = 12) -> Path:
    """Pack ``n`` synthetic normal images with the tiny model, thresholds included (K=3)."""
    from spade_edge.runtime.packer import pack

    train = folder / "train"
    train.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = train / f"img_{i:02d}.png"
        Image.fromarray(normal_array(i)).save(p)
        paths.append(p)
    g = folder / "gallery.bin"
    rep = pack(model, paths, g, progress=False, default_k=K)
    assert rep.thresholds is not None and rep.thresholds["k_image"] == K
    return g


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_argv(model: Path, gallery: Path, archive: Path, port: int, *extra: str) -> list[str]:
    exe = Path(sys.executable).with_name("spade-serve")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "spade_edge.cli.serve"]
    return [
        *head,
        str(model),
        str(gallery),
        "--port",
        str(port),
        "--archive",
        str(archive),
        *extra,
    ]


@contextmanager
def server_process(
    model: Path, gallery: Path, archive: Path, *extra: str, ready_timeout: float = 60.0
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real spade-serve on 127.0.0.1:<free port>; killed on exit whatever happens."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        serve_argv(model, gallery, archive, port, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise AssertionError(f"spade-serve exited {proc.returncode}:\n{out}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("spade-serve did not become ready in time")
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()
