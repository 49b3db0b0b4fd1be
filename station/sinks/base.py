"""What every sink shares: a bounded buffer and a worker thread, so the event loop never blocks.

Why: ``service.add_listener`` calls a sink on the serving event loop after each verdict; a slow
broker, PLC or web endpoint must never slow inspection. ``submit`` only appends to a bounded
buffer (the oldest result is dropped when it is full, and counted); a worker thread delivers.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

log = logging.getLogger("spade_edge.station")

DEFAULT_BUFFER = (
    10_000  # results held while an output is unreachable (documented in docs/station.md)
)


class BufferedSink:
    """Base: ``submit`` is O(1) and non-blocking; subclasses implement ``deliver(result) -> bool``.

    ``deliver`` returns True once the result is acknowledged (or must be given up) and False to
    retry it later, keeping order: the head of the buffer is retried until it succeeds.
    """

    kind = "sink"

    def __init__(self, name: str, buffer: int = DEFAULT_BUFFER) -> None:
        if buffer < 1:
            raise ValueError("buffer must be >= 1")
        self.name = name
        self.capacity = buffer
        self._buf: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.delivered = 0
        self.dropped = 0  # evicted because the buffer was full

    # -- called from the serving loop ------------------------------------------------------------
    def submit(self, result: dict[str, Any]) -> None:
        """Queue one verdict (never blocks; drops the oldest queued result when full)."""
        with self._cond:
            if len(self._buf) >= self.capacity:
                self._buf.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning(
                        "%s: buffer full (%d), dropped %d", self.name, self.capacity, self.dropped
                    )
            self._buf.append(result)
            self._cond.notify()

    @property
    def pending(self) -> int:
        """Results queued and not yet delivered."""
        with self._cond:
            return len(self._buf)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the connection/server and start the delivery thread."""
        self.open()
        self._thread = threading.Thread(target=self._run, name=f"sink-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued for up to ``timeout`` seconds, then close."""
        if self._thread is not None:
            with self._cond:
                self._cond.wait_for(lambda: not self._buf, timeout=max(0.0, timeout))
            self._stop.set()
            with self._cond:
                self._cond.notify_all()
            self._thread.join(timeout=max(1.0, timeout))
        self.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._buf or self._stop.is_set(), timeout=1.0)
                if self._stop.is_set() or not self._buf:
                    continue
                head = self._buf[0]
            try:
                ok = self.deliver(head)
            except Exception:  # a sink must never die: log and retry
                log.exception("%s: delivery failed", self.name)
                ok = False
            if ok:
                with self._cond:
                    if self._buf and self._buf[0] is head:
                        self._buf.popleft()
                    self.delivered += 1
                    self._cond.notify_all()
            else:
                self._stop.wait(self.retry_delay())

    # -- for subclasses ----------------------------------------------------------------------------
    def open(self) -> None:
        """Connect or start serving (called once by ``start``)."""

    def close(self) -> None:
        """Release the connection/server (called once by ``stop``)."""

    def deliver(self, result: dict[str, Any]) -> bool:
        """Deliver one result; True when done with it, False to retry it after ``retry_delay``."""
        raise NotImplementedError

    def retry_delay(self) -> float:
        """Seconds to wait before retrying the head of the buffer."""
        return 0.2
