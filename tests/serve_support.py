"""Shared helpers of the spade-serve tests: a tiny model + calibrated gallery, images, and a
real ``spade-serve`` process on a free loopback port that is always stopped."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from spade_edge_testing.serve_process import ServeNotReadyError, wait_ready
from spade_edge_testing.station_helpers import free_port

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
        try:
            wait_ready(url, proc, ready_timeout)
        except ServeNotReadyError as e:
            out = ""  # what it printed, once it has exited (a live child's pipe would block)
            if proc.poll() is not None and proc.stdout is not None:
                out = proc.stdout.read().decode(errors="replace")
            raise AssertionError(f"{e}\n{out}") from None
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()
