"""Sinks: where verdicts go (``--sink SPEC``), one module per protocol, chosen from ``SINKS``.

Each sink is a ``BufferedSink``: ``submit(result)`` never blocks the serving loop.
"""

from __future__ import annotations

from collections.abc import Callable

from spade_edge.runtime.registry import import_attr
from spade_edge.station.sinks.base import DEFAULT_BUFFER, BufferedSink
from spade_edge.station.spec import parse_spec

# kind -> ("module:class", option keys); modules import their protocol library lazily.
SINKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mqtt": (
        "spade_edge.station.sinks.mqtt:MqttSink",
        (
            "buffer",
            "backoff_min",
            "backoff_max",
            "keepalive",
            "client_id",
            "ack_timeout",
            "username",
            "password_file",
        ),
    ),
    "opcua": ("spade_edge.station.sinks.opcua:OpcUaSink", ("buffer",)),
    "webhook": (
        "spade_edge.station.sinks.webhook:WebhookSink",
        ("buffer", "retries", "backoff", "timeout"),
    ),
}


def open_sink(text: str, station: str) -> BufferedSink:
    """Build (not start) the sink a spec names; ``ConfigError`` naming the spec when it is bad."""
    spec = parse_spec(text, {k: v[1] for k, v in SINKS.items()}, "sink")
    factory: Callable[..., BufferedSink] = import_attr(SINKS[spec.kind][0]).from_spec
    return factory(spec, station)


__all__ = ["DEFAULT_BUFFER", "SINKS", "BufferedSink", "open_sink"]
