"""The watch folder in a real ``spade-serve`` process, killed with SIGKILL mid-stream.

Restart-safety: every file is scored exactly once across the crash (archived -> never again;
not archived -> scored after the restart), and each ends in done/.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from serve_support import make_gallery, normal_array, png_bytes, server_process
from station_helpers import wait_until

N_FILES = 40


def drop(folder: Path, name: str, data: bytes) -> None:
    """Rename-in convention: write a hidden file, then rename it into place."""
    tmp = folder / f".{name}"
    tmp.write_bytes(data)
    os.replace(tmp, folder / name)


def test_watch_folder_survives_kill_9_mid_stream(tmp_path: Path) -> None:
    from tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny.onnx", image_size=32)
    gallery = make_gallery(model, tmp_path / "g")
    watch = tmp_path / "in"
    watch.mkdir()
    archive = tmp_path / "archive"
    images = [png_bytes(normal_array(100 + i)) for i in range(8)]
    names = [f"part_{i:03d}.png" for i in range(N_FILES)]
    spec = f"watch:{watch}?settle=0&poll=0.02"
    done = watch / "done"

    with server_process(model, gallery, archive, "--source", spec) as (proc, _):
        sent = 0
        deadline = time.monotonic() + 60
        while sent < N_FILES:  # a stream of files; kill once some are done and more wait
            drop(watch, names[sent], images[sent % len(images)])
            sent += 1
            time.sleep(0.01)
            if done.is_dir() and len(list(done.iterdir())) >= 10 and sent >= 20:
                break
            assert time.monotonic() < deadline, "stream too slow"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    scored_before = len(list(done.iterdir()))
    assert 0 < scored_before < N_FILES  # really killed in the middle
    for i in range(sent, N_FILES):  # the camera keeps dropping files while the station is down
        drop(watch, names[i], images[i % len(images)])

    with server_process(model, gallery, archive, "--source", spec):
        wait_until(lambda: len(list(done.iterdir())) == N_FILES, timeout=120, step=0.1)

    assert sorted(p.name for p in done.iterdir()) == names
    assert not [p for p in watch.iterdir() if p.is_file()]
    assert not (watch / "failed").exists() or not list((watch / "failed").iterdir())
    con = sqlite3.connect(archive / "archive.sqlite")
    try:
        rows = con.execute("SELECT part_id, source FROM results").fetchall()
    finally:
        con.close()
    counts = Counter(part for part, _ in rows)
    assert counts == Counter({n[:-4]: 1 for n in names})  # each exactly once
    assert {src for _, src in rows} == {"watch"}
