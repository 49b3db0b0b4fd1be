"""The HTTP API v1 of spade-serve (FastAPI), a thin layer over :class:`InspectionService`.

Every error is ``{"error": "..."}`` with a status that says whose fault it is (4xx: the
request's; 503: come back later, with Retry-After; 504: timeout). JSON is strict (no NaN).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect as _inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from spade_edge.runtime import __version__
from spade_edge.runtime.errors import InputError, SpadeError
from spade_edge.serve.config import ServeConfig
from spade_edge.serve.errors import (
    NotReadyError,
    OverloadedError,
    TooLargeError,
    UnauthorizedError,
    http_status,
)
from spade_edge.serve.service import InspectionService

log = logging.getLogger(__name__)

Hook = Callable[[FastAPI], Awaitable[None] | None]
RETRY_AFTER_S = "1"
MAX_IDS = 1000


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise TooLargeError(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_from_request(request: Request, limit: int) -> tuple[bytes, dict[str, str]]:
    """The image bytes of a raw body or of multipart field ``image`` (plus other text fields).

    The Content-Type only says which of the two it is; the image format is sniffed later.
    """
    body = await read_body(request, limit)
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        if not body:
            raise InputError("empty request body: send the image file's bytes")
        return body, {}

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    form_req = Request(request.scope, replay)
    try:
        form = await form_req.form(max_files=1, max_fields=16)
    except Exception as e:  # malformed multipart of any kind
        raise InputError(f"malformed multipart body ({e})") from None
    try:
        field = form.get("image")
        if field is None or isinstance(field, str):
            raise InputError("multipart body has no file field 'image'")
        data = await field.read()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
    finally:
        await form.close()
    if not data:
        raise InputError("multipart field 'image' is empty")
    return data, fields


def require_token(request: Request) -> None:
    """State changes need ``Authorization: Bearer <token from --token-file>``."""
    token = request.app.state.service.config.token
    if token is None:
        raise UnauthorizedError("gallery changes are disabled: start spade-serve with --token-file")
    scheme, _, got = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(got.strip().encode(), token.encode()):
        raise UnauthorizedError("missing or wrong bearer token")


Auth = Annotated[None, Depends(require_token)]
PartId = Annotated[str | None, Query(max_length=256, description="Part identifier")]
StationName = Annotated[str | None, Query(max_length=256, description="Station name")]
ResultId = Annotated[int, Path(ge=1)]


def create_app(
    config: ServeConfig | None = None,
    *,
    service: InspectionService | None = None,
    extra_routers: Sequence[APIRouter] = (),
    on_start: Sequence[Hook] = (),
    on_stop: Sequence[Hook] = (),
    load_in_background: bool = False,
) -> FastAPI:
    """The spade-serve ASGI app. ``service``: an already loaded service (the CLI loads before
    binding, so a bad model is a clean error); else one is built from ``config`` and loaded in
    the lifespan (``load_in_background``: /readyz answers 503 until it is done).
    ``extra_routers`` / ``on_start`` / ``on_stop``: how the station mounts its page, events and
    sources/sinks (hooks get the app; they may be coroutines)."""
    if service is None:
        if config is None:
            raise ValueError("create_app needs a config or a service")
        service = InspectionService(config.validate())
    svc = service
    cfg = svc.config

    async def run_hooks(hooks: Sequence[Hook], app: FastAPI) -> None:
        for fn in hooks:
            out = fn(app)
            if _inspect.isawaitable(out):
                await out

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if load_in_background:
            loader = asyncio.get_running_loop().run_in_executor(None, _load_quietly, svc)
        else:
            await svc.start()
        await run_hooks(on_start, app)
        try:
            yield
        finally:
            await run_hooks(on_stop, app)
            if loader is not None:
                await loader
            await asyncio.to_thread(svc.stop)

    app = FastAPI(
        title="spade-serve",
        version=__version__,
        description="SPADE inspection service: verdicts, archive, live gallery updates.",
        lifespan=lifespan,
    )
    app.state.service = svc

    # -- errors: always {"error": ...} --
    @app.exception_handler(SpadeError)
    async def spade_error(request: Request, exc: SpadeError) -> JSONResponse:
        status = http_status(exc)
        headers = (
            {"Retry-After": RETRY_AFTER_S}
            if isinstance(exc, (OverloadedError, NotReadyError))
            else None
        )
        if isinstance(exc, UnauthorizedError):
            headers = {"WWW-Authenticate": "Bearer"}
        return _error(status, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "request"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return _error(400, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    # -- inspection --
    @app.post(
        "/v1/inspect",
        summary="Score one part",
        description="Body: the image file's bytes (PNG, JPEG, BMP or TIFF; sniffed from the "
        "content) or multipart field `image`. Answers after the verdict is archived.",
    )
    async def inspect(
        request: Request,
        part_id: PartId = None,
        station: StationName = None,
    ) -> JSONResponse:
        data, fields = await image_from_request(request, cfg.max_body_bytes)
        result = await svc.inspect(
            data,
            part_id=part_id or fields.get("part_id"),
            station=station or fields.get("station"),
            source="http",
        )
        return JSONResponse(result)

    @app.get("/v1/results", summary="Archived results (increasing id)")
    def results(
        since_id: Annotated[int | None, Query(ge=0)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        anomalous: bool | None = None,
    ) -> JSONResponse:
        return JSONResponse(
            {"results": svc.archive.query(since_id=since_id, limit=limit, anomalous=anomalous)}
        )

    @app.get("/v1/results/{rid}", summary="One archived result")
    def result(rid: ResultId) -> JSONResponse:
        return JSONResponse(svc.archive.get(rid))

    @app.get("/v1/results/{rid}/image", summary="The image as received (when kept)")
    def result_image(rid: ResultId) -> FileResponse:
        path, media = svc.image_file(rid)
        return FileResponse(path, media_type=media)

    @app.get("/v1/results/{rid}/overlay.png", summary="Heat-map overlay on the original")
    def result_overlay(rid: ResultId) -> FileResponse:
        return FileResponse(svc.overlay_png(rid), media_type="image/png")

    # -- gallery --
    @app.get("/v1/gallery", summary="Gallery versions, image counts, thresholds")
    def gallery() -> JSONResponse:
        return JSONResponse(svc.gallery_info())

    @app.post(
        "/v1/gallery/normal",
        summary="Add good parts to the gallery (new version, swapped in live)",
        description='JSON `{"ids": [...], "recalibrate": false}` (archived results) or an image '
        "body (raw or multipart `image`). Needs the bearer token.",
    )
    async def gallery_normal(
        request: Request,
        _auth: Auth,
        recalibrate: bool = False,
        part_id: PartId = None,
    ) -> JSONResponse:
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("application/json"):
            body = await read_body(request, 1 << 20)
            ids, recal = _parse_ids(body)
            out = await svc.add_normal(ids=ids, recalibrate=recalibrate or recal)
        else:
            data, fields = await image_from_request(request, cfg.max_body_bytes)
            out = await svc.add_normal(
                image=data, recalibrate=recalibrate, part_id=part_id or fields.get("part_id")
            )
        return JSONResponse(out)

    @app.post("/v1/gallery/rollback", summary="Serve another recorded gallery version")
    async def gallery_rollback(request: Request, _auth: Auth) -> JSONResponse:
        body = _json(await read_body(request, 1 << 16))
        v = body.get("version") if isinstance(body, dict) else None
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError('body must be {"version": N} with N >= 1')
        return JSONResponse(await svc.rollback(v))

    # -- health --
    @app.get("/healthz", summary="The process is alive")
    def healthz() -> JSONResponse:
        return JSONResponse({"status": "alive"})

    @app.get("/readyz", summary="Model and gallery loaded, warm-up inference done")
    def readyz() -> JSONResponse:
        if not svc.ready:
            why = svc.load_error or "loading model and gallery"
            return _error(503, f"not ready: {why}", {"Retry-After": RETRY_AFTER_S})
        return JSONResponse(
            {
                "status": "ready",
                "gallery_version": svc.active.version,
                "model": svc.model_fingerprint,
                "in_flight": svc.in_flight,
                "queue_depth": svc.queue_depth(),
            }
        )

    @app.get("/metrics", summary="Prometheus metrics")
    def metrics() -> Response:
        svc.metrics.archive_bytes.set(svc.archive.file_bytes)
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    for r in extra_routers:
        app.include_router(r)
    return app


def _json(body: bytes) -> Any:
    try:
        return json.loads(body or b"null", parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"body is not valid JSON ({e})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_ids(body: bytes) -> tuple[list[int], bool]:
    obj = _json(body)
    if not isinstance(obj, dict) or set(obj) - {"ids", "recalibrate"}:
        raise InputError('body must be {"ids": [result ids], "recalibrate": false}')
    ids = obj.get("ids")
    if (
        not isinstance(ids, list)
        or not 1 <= len(ids) <= MAX_IDS
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in ids)
    ):
        raise InputError(f'"ids" must be a list of 1..{MAX_IDS} result ids (integers >= 1)')
    recal = obj.get("recalibrate", False)
    if not isinstance(recal, bool):
        raise InputError('"recalibrate" must be true or false')
    return list(dict.fromkeys(ids)), recal


def _load_quietly(svc: InspectionService) -> None:
    """Background load: a failure stays visible through /readyz instead of killing the app."""
    try:
        svc.load()
    except Exception as e:
        log.error("loading failed: %s", e)


__all__ = ["create_app", "image_from_request", "read_body"]
