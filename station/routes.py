"""HTTP routes of the station (FastAPI; imported only when spade-serve mounts the station).

``/`` (the operator page), ``/static/NAME`` (its files, from the package), ``/v1/events``
(Server-Sent Events, one ``result`` event per archived verdict) and ``/v1/station`` (counters,
sources, sinks).
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from spade_edge.station.app import Station

STATIC = Path(__file__).resolve().parent / "static"
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_-]+\.(?:js|css|svg|png|ico)$")
_MEDIA = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
#: The page loads nothing from elsewhere and runs no inline script (line PCs are offline).
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
NO_SNIFF = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def station_router(station: Station) -> APIRouter:
    """The station's routes, bound to one ``Station``: ``/``, ``/static/NAME``, ``/v1/events``,
    ``/v1/station`` (pass it to ``create_app(extra_routers=[...])``)."""
    r = APIRouter()
    hub = station.hub

    @r.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(
            STATIC / "index.html",
            media_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": CSP, **NO_SNIFF},
        )

    @r.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        path = STATIC / name
        if not _STATIC_NAME.match(name) or not path.is_file():
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(path, media_type=_MEDIA[path.suffix], headers=NO_SNIFF)

    @r.get("/v1/events", tags=["station"], summary="Live verdicts (Server-Sent Events)")
    async def events(request: Request) -> StreamingResponse:
        """One ``event: result`` per archived verdict, ``id:`` = result id; a comment line
        every 15 s keeps the connection open through proxies."""
        return StreamingResponse(
            hub.stream(request.is_disconnected),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @r.get("/v1/station", tags=["station"], summary="Station counters, sources and sinks")
    def summary() -> JSONResponse:
        """Parts and rejects (totals and last hour), station name, sources and sinks."""
        return JSONResponse(station.summary())

    return r
