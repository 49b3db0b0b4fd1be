"""A real spade-serve app with the station mounted, on a uvicorn thread on a free loopback port.

Used by the station tests and benches/bench_station.py: the same ``create_app`` the CLI runs,
with the model and gallery the caller gives (the tests: the tiny model and a calibrated
synthetic gallery, tests/serve_support.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spade_edge_testing.station_helpers import free_port

TOKEN = "s3cret-token"


@contextmanager
def station_server(
    model: Path,
    gallery: Path,
    archive: Path,
    *,
    sources: Sequence[str] = (),
    sinks: Sequence[str] = (),
    station: str = "line-1",
    ready_timeout: float = 60.0,
    **config: Any,
) -> Iterator[tuple[str, Any]]:
    """Yield (base URL, Station); the server is stopped (and joined) on exit."""
    import httpx
    import uvicorn

    from spade_edge.serve import ServeConfig, create_app
    from spade_edge.station.app import Station
    from spade_edge.station.routes import station_router

    st = Station(sources, sinks, station=station)
    cfg = ServeConfig(
        model=model, gallery=gallery, archive=archive, token=TOKEN, station=station, **config
    )
    app = create_app(
        cfg, extra_routers=[station_router(st)], on_start=[st.start], on_stop=[st.stop]
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5
        )
    )
    thread = threading.Thread(target=server.run, name="spade-serve-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if not thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("spade-serve did not become ready")
            time.sleep(0.05)
        yield url, st
    finally:
        st.hub.close_threadsafe()
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "spade-serve thread did not stop"
