"""Webhook sink: POST each verdict's JSON to a URL, retrying with exponential backoff.

A result is retried on connection errors, timeouts, 408, 429 and 5xx answers, up to ``retries``
times (backoff ``backoff`` s doubling, at most 30 s), then logged and dropped so one dead
endpoint cannot stall the station forever; other 4xx answers are not retried (the endpoint
rejected the payload). Standard library HTTP only: no extra dependency.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from spade_edge.runtime.errors import ConfigError
from spade_edge.station.sinks.base import DEFAULT_BUFFER, BufferedSink, log
from spade_edge.station.spec import Spec

RETRY_STATUS = {408, 429}


class WebhookSink(BufferedSink):
    """POSTs ``application/json`` results in order; see the module docstring for retries."""

    kind = "webhook"

    def __init__(
        self,
        url: str,
        *,
        buffer: int = DEFAULT_BUFFER,
        retries: int = 5,
        backoff: float = 0.5,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(f"webhook:{url}", buffer)
        self.url = url
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.failed = 0  # results given up after all retries
        self._attempts = 0

    @classmethod
    def from_spec(cls, spec: Spec, station: str) -> WebhookSink:
        """``webhook:http(s)://…``."""
        url = urlsplit(spec.target)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"sink {spec.text!r}: expected webhook:http://HOST[:PORT]/PATH")
        return cls(
            spec.target,
            buffer=spec.integer("buffer", DEFAULT_BUFFER, minimum=1),
            retries=spec.integer("retries", 5, minimum=0),
            backoff=spec.number("backoff", 0.5, minimum=0.0),
            timeout=spec.number("timeout", 5.0, minimum=0.1),
        )

    def deliver(self, result: dict[str, Any]) -> bool:
        try:
            body = json.dumps(result, allow_nan=False, separators=(",", ":")).encode()
        except ValueError as e:
            log.error("%s: result %s dropped: %s", self.name, result.get("id"), e)
            return True
        req = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                resp.read()
            self._attempts = 0
            return True
        except urllib.error.HTTPError as e:
            retry, why = e.code in RETRY_STATUS or e.code >= 500, f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            retry, why = True, str(getattr(e, "reason", e))
        self._attempts += 1
        if not retry or self._attempts > self.retries:
            log.error(
                "%s: result %s dropped after %d attempt(s): %s",
                self.name,
                result.get("id"),
                self._attempts,
                why,
            )
            self.failed += 1
            self._attempts = 0
            return True
        return False

    def retry_delay(self) -> float:
        return min(30.0, self.backoff * 2 ** max(0, self._attempts - 1))
