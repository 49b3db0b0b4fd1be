"""The station on the real spade-serve app: watch folder in, webhook out, SSE and counters.

In-process uvicorn on a free loopback port (spade_edge_testing.station_server), tiny model.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serve_support import defect_array, make_gallery, normal_array, png_bytes  # noqa: E402

from spade_edge_testing.station_helpers import wait_until  # noqa: E402
from spade_edge_testing.station_server import station_server  # noqa: E402


class _Hook(BaseHTTPRequestHandler):
    got: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        self.got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a: Any) -> None:
        pass


def test_watch_to_webhook_events_and_counters(tmp_path: Path) -> None:
    from tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny.onnx", image_size=32)
    gallery = make_gallery(model, tmp_path / "g")
    watch = tmp_path / "in"
    watch.mkdir()
    _Hook.got = []
    hook = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        with (
            station_server(
                model,
                gallery,
                tmp_path / "archive",
                sources=[f"watch:{watch}?settle=0&poll=0.02"],
                sinks=[f"webhook:http://127.0.0.1:{hook.server_port}/verdicts"],
            ) as (url, st),
            httpx.Client(timeout=30) as http,
        ):
            events: list[dict[str, Any]] = []

            def listen() -> None:
                with http.stream("GET", f"{url}/v1/events") as r:
                    assert r.headers["content-type"].startswith("text/event-stream")
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(json.loads(line[6:]))
                        if len(events) >= 3:
                            return

            t = threading.Thread(target=listen, daemon=True)
            t.start()
            wait_until(lambda: st.hub.subscribers == 1, 10)
            for name, arr in (("good_1", normal_array(1)), ("bad_2", defect_array())):
                (watch / f".{name}.png").write_bytes(png_bytes(arr))
                os.replace(watch / f".{name}.png", watch / f"{name}.png")
                wait_until(lambda n=name: (watch / "done" / f"{n}.png").exists(), 30)
            (watch / "junk.png").write_bytes(b"not an image")
            wait_until(lambda: (watch / "failed" / "junk.png.error.txt").exists(), 30)
            r = http.post(
                f"{url}/v1/inspect",
                content=png_bytes(normal_array(3)),
                params={"part_id": "http_3"},
                headers={"Content-Type": "image/png"},
            )
            assert r.status_code == 200
            t.join(timeout=20)
            assert [e["part_id"] for e in events] == ["good_1", "bad_2", "http_3"]
            wait_until(lambda: st.sinks[0].delivered == 3, 20)
            assert [g["part_id"] for g in _Hook.got] == ["good_1", "bad_2", "http_3"]
            assert [g["source"] for g in _Hook.got] == ["watch", "watch", "http"]
            s = http.get(f"{url}/v1/station").json()
            assert s["parts"] == 3 and s["last_hour"]["parts"] == 3
            assert s["rejects"] == sum(e["anomalous"] is True for e in events)
            assert s["sources"][0]["scored"] == 2 and s["sources"][0]["failed"] == 1
            assert s["sinks"][0]["delivered"] == 3 and s["sinks"][0]["pending"] == 0
            err = (watch / "failed" / "junk.png.error.txt").read_text()
            assert "junk.png" in err
            page = http.get(f"{url}/")
            assert (
                page.status_code == 200
                and "script-src 'self'" in page.headers["content-security-policy"]
            )
            assert http.get(f"{url}/static/app.js").status_code == 200
            assert http.get(f"{url}/static/..%2Fapp.py").status_code == 404
    finally:
        hook.shutdown()
        hook.server_close()
