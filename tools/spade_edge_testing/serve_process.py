"""Waiting for a spade-serve child process (the serve tests and benches/bench_serve.py).

``GET /readyz`` is polled until it answers 200, bounded in time; a child that exits while
starting is reported at once instead of after the timeout.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any


class ServeNotReadyError(RuntimeError):
    """spade-serve exited, or did not answer ``/readyz`` with 200 in time (the message says)."""


def wait_ready(url: str, proc: subprocess.Popen[Any], timeout: float, step: float = 0.1) -> None:
    """Return once ``url``/readyz answers 200; ``ServeNotReadyError`` when ``proc`` exits or
    ``timeout`` seconds pass first."""
    import httpx  # the [serve] extra's client: tests without it skip before they start a server

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServeNotReadyError(f"spade-serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise ServeNotReadyError(f"spade-serve not ready after {timeout:g} s")
        time.sleep(step)
