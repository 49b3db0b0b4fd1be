"""The watch folder in a real ``spade-serve`` process, killed with SIGKILL mid-stream.

Restart-safety: every file is scored exactly once across the crash (archived -> never again;
not archived -> scored after the restart), and each ends in done/.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import serve_support
from serve_support import make_gallery, normal_array, png_bytes, server_process

from spade_edge_testing.station_helpers import wait_until

N_FILES = 40


def drop(folder: Path, name: str, data: bytes) -> None:
    """Rename-in convention: write a hidden file, then rename it into place."""
    tmp = folder / f".{name}"
    tmp.write_bytes(data)
    os.replace(tmp, folder / name)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tiny_model import make_tiny_model

    d = tmp_path_factory.mktemp("station_process")
    model = make_tiny_model(d / "tiny.onnx", image_size=32)
    return model, make_gallery(model, d / "g")


def test_watch_folder_survives_kill_9_mid_stream(artifacts, tmp_path: Path) -> None:
    model, gallery = artifacts
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


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("--source=bogus:/x", "unknown kind"),
        ("--source=genicam:/nonexistent/producer.cti", "GenTL producer file not found"),
        ("--sink=mqtt://127.0.0.1:1883/a/#", "must not contain"),
        ("--sink=opcua://127.0.0.1:{busy}", "cannot listen on 127.0.0.1:{busy}"),
    ],
)
def test_cli_bad_spec_is_one_line_before_loading(artifacts, tmp_path, spec, needle) -> None:
    model, gallery = artifacts
    with socket.socket() as busy:  # a port someone else holds
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        spec, needle = spec.format(busy=port), needle.format(busy=port)
        argv = serve_support.serve_argv(
            model, gallery, tmp_path / "a", serve_support.free_port(), spec
        )
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "a").exists()  # refused before the archive was created


def test_sigterm_ends_open_event_streams_and_exits_0(artifacts, tmp_path: Path) -> None:
    import httpx

    model, gallery = artifacts
    with server_process(model, gallery, tmp_path / "a") as (proc, url):
        opened = threading.Event()
        ended: list[float] = []

        def listen() -> None:
            with httpx.Client(timeout=60) as c, c.stream("GET", f"{url}/v1/events") as r:
                opened.set()
                for _ in r.iter_lines():
                    pass
            ended.append(time.monotonic())

        t = threading.Thread(target=listen, daemon=True)
        t.start()
        assert opened.wait(20)
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        t.join(timeout=10)
        # the stream ended by itself, well before uvicorn's graceful timeout (--timeout-s + 5)
        assert ended and ended[0] - t0 < 10
