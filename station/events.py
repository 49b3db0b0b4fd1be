"""Server push for the page: ``GET /v1/events`` (Server-Sent Events) and the station summary.

Why SSE: one-way, plain HTTP, reconnects by itself in every browser, no extra library. Each
archived verdict goes to every open stream as ``event: result`` with the API v1 result JSON and
``id:`` = the result id (the page catches up through ``/v1/results?since_id=`` after a
reconnect). Each stream has a bounded queue: a stalled browser loses the oldest events, never
the server's memory. A comment line every ``heartbeat`` seconds keeps proxies from timing out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

_CLOSE = object()
WINDOW_S = 3600.0  # reject rate over the last hour
WINDOW_MAX = 200_000  # bound on the in-memory window (about 55 parts/s for an hour)


def _epoch(iso: str | None) -> float:
    if not iso:
        return time.time()
    try:
        return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


class EventHub:
    """Fans verdicts out to SSE streams and keeps the counters the page shows."""

    def __init__(self, queue_size: int = 256, heartbeat: float = 15.0) -> None:
        self.queue_size = queue_size
        self.heartbeat = heartbeat
        self._subs: set[asyncio.Queue[Any]] = set()
        self._window: deque[tuple[float, bool]] = deque(maxlen=WINDOW_MAX)
        self.parts = 0
        self.rejects = 0
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- counters ------------------------------------------------------------------------------
    def seed(self, parts: int, rejects: int, recent: list[dict[str, Any]]) -> None:
        """Start from the archive's totals and recent rows (a restart keeps the page's view)."""
        self.parts, self.rejects = parts, rejects
        cutoff = time.time() - WINDOW_S
        for r in recent:
            t = _epoch(r.get("time"))
            if t >= cutoff:
                self._window.append((t, r.get("anomalous") is True))

    def summary(self) -> dict[str, Any]:
        """Totals and the last hour (``reject_rate`` is None with no part in the last hour)."""
        cutoff = time.time() - WINDOW_S
        while self._window and self._window[0][0] < cutoff:
            self._window.popleft()
        n = len(self._window)
        rej = sum(1 for _, a in self._window if a)
        return {
            "parts": self.parts,
            "rejects": self.rejects,
            "last_hour": {"parts": n, "rejects": rej, "reject_rate": rej / n if n else None},
        }

    # -- fan-out ---------------------------------------------------------------------------------
    def publish(self, result: dict[str, Any]) -> None:
        """Service listener: called on the event loop after each archived verdict; never blocks."""
        self.parts += 1
        anomalous = result.get("anomalous") is True
        self.rejects += int(anomalous)
        self._window.append((_epoch(result.get("time")), anomalous))
        for q in list(self._subs):
            if q.full():
                q.get_nowait()  # a stalled browser loses the oldest event
            q.put_nowait(result)

    def close(self) -> None:
        """End every stream (server shutdown); safe to call more than once, on the loop thread."""
        self.closed = True
        for q in list(self._subs):
            if q.full():
                q.get_nowait()
            q.put_nowait(_CLOSE)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember the serving loop, so ``close_threadsafe`` works from other threads."""
        self._loop = loop

    def close_threadsafe(self) -> None:
        """``close`` from any thread (signal handlers, tests stopping the server)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.close)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    async def stream(self, is_disconnected: Any = None) -> AsyncIterator[bytes]:
        """The SSE byte stream for one client (ends on ``close`` or when the client leaves)."""
        q: asyncio.Queue[Any] = asyncio.Queue(self.queue_size)
        self._subs.add(q)
        try:
            yield b"retry: 1000\n: connected\n\n"
            while not self.closed:
                try:
                    item = await asyncio.wait_for(q.get(), timeout=self.heartbeat)
                except (TimeoutError, asyncio.TimeoutError):
                    if is_disconnected is not None and await is_disconnected():
                        return
                    yield b": keep-alive\n\n"
                    continue
                if item is _CLOSE:
                    return
                data = json.dumps(item, allow_nan=False, separators=(",", ":"))
                yield f"id: {item.get('id', '')}\nevent: result\ndata: {data}\n\n".encode()
        finally:
            self._subs.discard(q)
