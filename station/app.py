"""The station inside spade-serve: page routes, ``/v1/events``, and the sources/sinks life cycle.

    st = Station(sources=["watch:/data/in"], sinks=["mqtt://127.0.0.1:1883/line1"], station="s1")
    app = create_app(
        config, extra_routers=[station_router(st)], on_start=[st.start], on_stop=[st.stop]
    )

``station_router`` (``spade_edge.station.routes``) holds the HTTP side and imports FastAPI; this
module does not, so building a ``Station`` (and checking its specs) needs no web framework.

Specs are parsed when the ``Station`` is built, so a bad ``--source``/``--sink`` fails before
the model loads, with one line naming the spec. Sinks start before sources (no verdict is fed
before its outputs listen) and stop after them (queued verdicts are delivered on shutdown).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Sequence
from typing import Any

from spade_edge.runtime.errors import SpadeError
from spade_edge.station.events import EventHub
from spade_edge.station.sinks import BufferedSink, open_sink
from spade_edge.station.sources import open_source
from spade_edge.station.sources.base import log

SEED_ROWS = 20_000  # recent rows read at start for the last-hour counters


class Station:
    """Sources, sinks and the page of one station (see the module docstring)."""

    def __init__(
        self,
        sources: Sequence[str] = (),
        sinks: Sequence[str] = (),
        *,
        station: str | None = None,
        fps: float | None = None,
        sink_stop_timeout: float = 5.0,
    ) -> None:
        self.station = station or "station"
        self.sources = [open_source(s, fps=fps) for s in sources]
        self.sinks: list[BufferedSink] = [open_sink(s, self.station) for s in sinks]
        self.hub = EventHub()
        self.sink_stop_timeout = sink_stop_timeout
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: list[Any] = []
        self._started_sinks: list[BufferedSink] = []
        self._restore_signals: list[tuple[int, Any]] = []

    def summary(self) -> dict[str, Any]:
        """What ``GET /v1/station`` answers."""
        return {
            "station": self.station,
            **self.hub.summary(),
            "sources": [
                {
                    "name": s.name,
                    "scored": getattr(s, "scored", 0),
                    "failed": getattr(s, "failed", 0),
                }
                for s in self.sources
            ],
            "sinks": [
                {
                    "name": k.name,
                    "pending": k.pending,
                    "delivered": k.delivered,
                    "dropped": k.dropped,
                    "buffer": k.capacity,
                }
                for k in self.sinks
            ],
        }

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self, app: Any) -> None:
        """Seed counters, subscribe the page and sinks, start sinks, then sources.

        ``app``: the FastAPI app (its ``state.service``) or an ``InspectionService`` itself.
        """
        state = getattr(app, "state", None)
        service = getattr(state, "service", None) or app
        archive = getattr(service, "archive", None)
        if archive is not None:
            counts = await asyncio.to_thread(archive.counts)
            recent = await asyncio.to_thread(archive.query, None, SEED_ROWS)
            self.hub.seed(counts["results"], counts["anomalous"], recent)
        self.hub.bind(asyncio.get_running_loop())
        self._unsubscribe.append(service.add_listener(self.hub.publish))
        for sink in self.sinks:
            await asyncio.to_thread(sink.start)
            self._started_sinks.append(sink)
            self._unsubscribe.append(service.add_listener(sink.submit))
            if hasattr(sink, "set_ready"):
                await asyncio.to_thread(sink.set_ready, True)
        for src in self.sources:
            task = asyncio.create_task(self._run_source(src, service), name=src.name)
            self._tasks.append(task)
        self._chain_signals()

    async def _run_source(self, src: Any, service: Any) -> None:
        try:
            await src.run(service)
        except asyncio.CancelledError:
            raise
        except SpadeError as e:  # e.g. a camera that cannot be opened: one line, keep serving
            log.error("source %s stopped: %s", src.name, e)
        except Exception:
            log.exception("source %s stopped", src.name)

    async def stop(self, *_: Any) -> None:
        """Stop sources, end event streams, deliver what sinks hold (bounded), close them."""
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.hub.close()
        for unsub in self._unsubscribe:
            unsub()
        self._unsubscribe.clear()
        for sink in self._started_sinks:
            await asyncio.to_thread(sink.stop, self.sink_stop_timeout)
        self._started_sinks.clear()
        for sig, prev in self._restore_signals:
            signal.signal(sig, prev)
        self._restore_signals.clear()

    def _chain_signals(self) -> None:
        """End SSE streams as soon as SIGTERM/SIGINT arrives, before the server waits for open
        connections to finish (an event stream never finishes by itself)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            prev = signal.getsignal(sig)
            if not callable(prev):  # default/ignored: leave the process's behaviour alone
                continue

            def handler(signum: int, frame: Any, prev: Any = prev) -> None:
                self.hub.close_threadsafe()
                prev(signum, frame)

            signal.signal(sig, handler)
            self._restore_signals.append((sig, prev))
