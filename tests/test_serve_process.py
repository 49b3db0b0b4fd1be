"""The real `spade-serve` process on a free 127.0.0.1 port: HTTP, SIGTERM, kill -9, refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serve_support import (  # noqa: E402
    defect_array,
    free_port,
    make_gallery,
    normal_array,
    png_bytes,
    serve_argv,
    server_process,
)

TOKEN = "process-test-token"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tiny_model import make_tiny_model

    d = tmp_path_factory.mktemp("serve_proc")
    model = make_tiny_model(d / "tiny.onnx", image_size=32)
    return model, make_gallery(model, d)


def _inspect(url: str, data: bytes, part_id: str, timeout: float = 30.0) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/inspect",
        content=data,
        params={"part_id": part_id},
        headers={"content-type": "image/png"},
        timeout=timeout,
    )


def test_http_roundtrip_and_kill9_loses_no_acknowledged_result(artifacts, tmp_path: Path) -> None:
    model, gallery = artifacts
    archive = tmp_path / "archive"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    acked: dict[int, dict] = {}
    with server_process(model, gallery, archive, "--token-file", str(token_file)) as (proc, url):
        assert httpx.get(f"{url}/healthz", timeout=5).json() == {"status": "alive"}
        bad = _inspect(url, png_bytes(defect_array()), "d0").json()
        assert bad["anomalous"] is True
        r = httpx.post(
            f"{url}/v1/gallery/normal",
            json={"ids": [bad["id"]]},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["version"] == 2
        # a stream of parts from 4 clients; kill -9 while they are still posting
        stop = time.monotonic() + 20

        def client(k: int) -> None:
            for i in range(100):
                if time.monotonic() > stop:
                    return
                try:
                    r = _inspect(url, png_bytes(normal_array(k * 100 + i)), f"c{k}-{i}", 10)
                except httpx.TransportError:
                    return  # the server died under us: this request was never acknowledged
                if r.status_code == 200:
                    acked[r.json()["id"]] = r.json()

        with ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(client, k) for k in range(4)]
            deadline = time.monotonic() + 30
            while len(acked) < 20 and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            for f in futs:
                f.result(timeout=60)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert len(acked) >= 20
    # restart on the same archive: every acknowledged result is there, unchanged
    with server_process(model, gallery, archive) as (_, url):
        got = {}
        since = 0
        for _ in range(100):  # bounded paging
            page = httpx.get(
                f"{url}/v1/results", params={"since_id": since, "limit": 1000}, timeout=10
            ).json()["results"]
            if not page:
                break
            got.update({r["id"]: r for r in page})
            since = page[-1]["id"]
        for rid, res in acked.items():
            assert got.get(rid) == res, rid
        # the gallery version survived too, and new ids continue after the old ones
        assert httpx.get(f"{url}/v1/gallery", timeout=10).json()["current"] == 2
        nxt = _inspect(url, png_bytes(normal_array(5)), "after").json()
        assert nxt["id"] > max(got) and nxt["gallery_version"] == 2


def test_sigterm_finishes_in_flight_requests_and_exits_0(artifacts, tmp_path: Path) -> None:
    model, gallery = artifacts
    archive = tmp_path / "archive"
    answered: list[int] = []
    errors: list[str] = []
    with server_process(model, gallery, archive) as (proc, url):
        stop = time.monotonic() + 30

        def client(k: int) -> None:
            for i in range(200):  # a new connection per request: no idle keep-alive to lose
                if time.monotonic() > stop:
                    return
                try:
                    r = _inspect(url, png_bytes(normal_array(k * 1000 + i)), f"t{k}-{i}")
                except httpx.ConnectError:
                    return  # refused: the server had stopped accepting (never acknowledged)
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    return
                answered.append(r.status_code)

        with ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(client, k) for k in range(4)]
            deadline = time.monotonic() + 30
            while (
                len(answered) < 8 or httpx.get(f"{url}/readyz", timeout=5).json()["in_flight"] < 1
            ):
                assert time.monotonic() < deadline, "no request in flight"
            proc.send_signal(signal.SIGTERM)
            for f in futs:
                f.result(timeout=60)
        assert proc.wait(timeout=60) == 0
    # nothing accepted was dropped: every answer is a 200 and is in the archive
    assert not errors, errors
    assert answered and set(answered) == {200}
    import sqlite3

    with sqlite3.connect(archive / "archive.sqlite") as con:
        assert con.execute("SELECT COUNT(*) FROM results").fetchone()[0] == len(answered)


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = serve_argv(Path(args[0]), Path(args[1]), Path(args[2]), free_port(), *args[3:])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("extra", "code", "needle"),
    [
        (["--host", "0.0.0.0"], 2, "--token-file"),
        (["--max-batch", "0"], 2, "--max-batch"),
        (["--keep-images", "few"], 2, "--keep-images"),
        (["--token-file", "/nonexistent/token"], 2, "token"),
    ],
)
def test_cli_refusals_are_one_line_and_never_bind(artifacts, tmp_path, extra, code, needle) -> None:
    model, gallery = artifacts
    r = _run_cli(str(model), str(gallery), str(tmp_path / "a"), *extra)
    assert r.returncode == code, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_cli_bad_model_or_gallery(artifacts, tmp_path: Path) -> None:
    model, gallery = artifacts
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"nope" * 10)
    r = _run_cli(str(model), str(junk), str(tmp_path / "a"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and str(junk) in r.stderr
    r = _run_cli(str(junk), str(gallery), str(tmp_path / "b"))
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_cli_busy_port_is_a_clean_error(artifacts, tmp_path: Path) -> None:
    import socket

    model, gallery = artifacts
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        argv = serve_argv(model, gallery, tmp_path / "a", port)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot listen" in r.stderr and "Traceback" not in r.stderr


def test_export_results_cli(artifacts, tmp_path: Path) -> None:
    model, gallery = artifacts
    archive = tmp_path / "archive"
    with server_process(model, gallery, archive) as (_, url):
        for i in range(3):
            assert _inspect(url, png_bytes(normal_array(i)), f"e{i}").status_code == 200
        head = serve_argv(model, gallery, archive, 0)[:-6]  # the executable part
        out = tmp_path / "r.csv"
        r = subprocess.run(
            [*head, "export-results", str(archive), "--csv", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ},
        )
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith("id,time,part_id") and len(lines) == 4
    r = subprocess.run(
        [*head, "export-results", str(tmp_path / "none"), "--csv", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "no spade-serve archive" in r.stderr
