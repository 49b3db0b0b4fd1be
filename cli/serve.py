"""`spade-serve MODEL GALLERY`: the always-on inspection service; `spade-serve export-results`.

The station (operator page at ``/``, ``--source``/``--sink``) is mounted on the same app.

Model and gallery are loaded (and one warm-up inference run) before the port is bound, so a bad
model, gallery or option is one clear line and an exit code, never a half-started server.
SIGTERM / Ctrl-C: stop accepting, finish requests in flight, commit the archive, exit 0.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from spade_edge.cli import _common as common
from spade_edge.cli import options as opt
from spade_edge.runtime.errors import BackendUnavailableError, InputError
from spade_edge.station.app import Station

app = common.new_app()
export_app = common.new_app()


def _need_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError(
            f"spade-serve needs the serve extra ({e.name} missing): pip install 'spade-edge[serve]'"
        ) from None


def _listen(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn so a busy port is a clean error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    # accepted connections inherit TCP_NODELAY from this socket; without it a response's body
    # segment waits for the client's delayed ACK (tens of ms per request)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@common.command(app)
def serve(
    model: opt.Model,
    gallery: Annotated[Path, typer.Argument(help="Gallery file from spade-pack (version 1).")],
    host: Annotated[str, typer.Option(help="Address to bind; non-loopback needs a token.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    backend: opt.Backend = "auto",
    matcher: opt.Matcher = "numpy",
    k: Annotated[int | None, typer.Option("--k", help="K (default: the gallery's).")] = None,
    archive: Annotated[
        Path, typer.Option(help="Folder of the result archive and gallery versions.")
    ] = Path("spade-archive"),
    token_file: Annotated[
        Path | None, typer.Option(help="File holding the bearer token for gallery changes.")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Images per inference batch at most.")] = 8,
    max_wait_ms: Annotated[
        float, typer.Option(help="How long a batch waits for more images.")
    ] = 5.0,
    queue: Annotated[int, typer.Option(help="Requests in flight at most (then 503).")] = 64,
    station: Annotated[str | None, typer.Option(help="Station name stored with results.")] = None,
    keep_images: Annotated[
        str, typer.Option(help="Which images the archive keeps: anomalous, all or none.")
    ] = "all",
    image_budget_mb: Annotated[
        float, typer.Option(help="Disk budget of kept images; oldest normal ones go first.")
    ] = 1024.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest accepted request body.")] = 32.0,
    timeout_s: Annotated[float, typer.Option(help="Per-request timeout (then 504).")] = 30.0,
    insecure: Annotated[
        bool, typer.Option(help="Allow a non-loopback --host without --token-file.")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Check gallery checksums and finiteness when loading a version (default).",
        ),
    ] = True,
    source: Annotated[
        list[str] | None,
        typer.Option(help="Image source (repeatable): watch:DIR, camera:URL|INDEX, genicam:CTI."),
    ] = None,
    sink: Annotated[
        list[str] | None,
        typer.Option(
            help="Verdict output (repeatable): mqtt://H:P/PREFIX, opcua://H:P, webhook:URL."
        ),
    ] = None,
    fps: Annotated[float | None, typer.Option(help="Frame-rate cap of camera sources.")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve verdicts over HTTP: API v1, result archive, live gallery updates, metrics."""
    _need_extra()
    # the [serve] extra (fastapi, uvicorn) loads only for this command, never for `spade --help`;
    # spade_edge.serve and the station's routes are built on FastAPI
    import uvicorn

    from spade_edge.serve import InspectionService, ServeConfig, create_app
    from spade_edge.serve.config import read_token
    from spade_edge.station.routes import station_router

    cfg = ServeConfig(
        model=model,
        gallery=gallery,
        host=host,
        port=port,
        backend=backend,
        matcher=matcher,
        k=k,
        archive=archive,
        token=read_token(token_file) if token_file is not None else None,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        queue=queue,
        station=station,
        keep_images=keep_images,
        image_budget_mb=image_budget_mb,
        max_body_mb=max_body_mb,
        timeout_s=timeout_s,
        insecure=insecure,
        verify=verify,
    ).validate()
    # specs are parsed here: a bad --source/--sink is one line before anything loads
    st = Station(source or (), sink or (), station=station, fps=fps)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    sock = _listen(host, port)
    svc = InspectionService(cfg)
    try:
        svc.load()
    except BaseException:
        sock.close()
        svc.stop()
        raise
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(
                service=svc,
                extra_routers=[station_router(st)],
                on_start=[st.start],
                on_stop=[st.stop],
            ),
            log_level=log_level,
            # beyond the service's own queue, uvicorn answers 503 itself: bounded memory
            limit_concurrency=2 * cfg.queue + 16,
            timeout_graceful_shutdown=int(cfg.timeout_s) + 5,
            access_log=False,
        )
    )
    print(f"spade-serve: http://{host}:{sock.getsockname()[1]} (ready)", file=sys.stderr)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler
    # it found: make that a no-op so a requested stop exits 0 after the archive is flushed
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    if not server.started:
        raise typer.Exit(1)


@common.command(export_app, "export-results")
def export_results(
    archive: Annotated[Path, typer.Argument(help="spade-serve archive folder.")],
    csv_out: Annotated[Path, typer.Option("--csv", help="CSV file to write.")],
    since_id: Annotated[int, typer.Option(min=0, help="Only results with a larger id.")] = 0,
) -> None:
    """Write archived results as CSV (for MES); safe beside a running server."""
    common.check_output_file(csv_out, "--csv")
    from spade_edge.serve.archive import export_csv  # spade_edge.serve needs the [serve] extra

    n = export_csv(archive, csv_out, since_id=since_id)
    typer.echo(f"{n} results -> {csv_out}", err=True)


def main() -> None:
    """`spade-serve MODEL GALLERY ...` or `spade-serve export-results DIR --csv F`."""
    if len(sys.argv) > 1 and sys.argv[1] == "export-results":
        del sys.argv[1]
        common.make_main(export_app)()
    else:
        common.make_main(app)()


if __name__ == "__main__":
    main()
