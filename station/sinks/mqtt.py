"""MQTT sink (paho-mqtt): every verdict as JSON on ``PREFIX/STATION/result``, QoS 1, retained.

``PREFIX/STATION/status`` is ``online`` (retained) while connected, and the broker publishes the
last will ``offline`` (retained) when the station vanishes. paho's network thread reconnects with
exponential backoff (``backoff_min``..``backoff_max`` seconds). Delivery is at-least-once: a
result leaves the bounded buffer only when the broker acknowledged it (PUBACK), so results
produced while the broker is down are published, in order, once it is back; a result sent just
before a connection drop may arrive twice (consumers de-duplicate on ``id``). A broker that
wants a login: ``?username=U&password_file=F``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from spade_edge.runtime.errors import BackendUnavailableError, ConfigError
from spade_edge.station.sinks.base import DEFAULT_BUFFER, BufferedSink, log
from spade_edge.station.spec import Spec, host_port


def _read_password(spec: Spec) -> str | None:
    """``password_file=F``: the broker password (never on the command line, never logged)."""
    path = spec.options.get("password_file")
    if path is None:
        return None
    if "username" not in spec.options:
        raise ConfigError(f"sink {spec.text!r}: password_file needs username=")
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"sink {spec.text!r}: cannot read password_file {path}: {e}") from None


class MqttSink(BufferedSink):
    """Publishes verdicts to an MQTT broker; see the module docstring for the guarantees."""

    kind = "mqtt"

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        station: str,
        *,
        buffer: int = DEFAULT_BUFFER,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        keepalive: int = 30,
        client_id: str | None = None,
        ack_timeout: float = 5.0,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        super().__init__(f"mqtt://{host}:{port}/{prefix}", buffer)
        base = "/".join(p for p in (prefix.strip("/"), station) if p)
        self.host, self.port = host, port
        self.result_topic = f"{base}/result"
        self.status_topic = f"{base}/status"
        self.backoff = (backoff_min, max(backoff_min, backoff_max))
        self.keepalive = keepalive
        self.client_id = client_id or f"spade-edge-{station}"
        self.ack_timeout = ack_timeout
        self.username, self.password = username, password
        self._connected = threading.Event()
        self._closing = False
        self._client: Any = None

    @classmethod
    def from_spec(cls, spec: Spec, station: str) -> MqttSink:
        """``mqtt://HOST:PORT/PREFIX`` (port 1883 when omitted)."""
        host, port, path = host_port(spec, 1883, "mqtt://HOST:PORT/TOPIC_PREFIX")
        prefix = path.strip("/")
        if "#" in spec.target or "+" in prefix:
            raise ConfigError(f"sink {spec.text!r}: topic prefix must not contain '#' or '+'")
        return cls(
            host,
            port,
            prefix,
            station,
            buffer=spec.integer("buffer", DEFAULT_BUFFER, minimum=1),
            backoff_min=spec.number("backoff_min", 0.5, minimum=0.05),
            backoff_max=spec.number("backoff_max", 30.0, minimum=0.05),
            keepalive=spec.integer("keepalive", 30, minimum=5),
            client_id=spec.options.get("client_id"),
            ack_timeout=spec.number("ack_timeout", 5.0, minimum=0.1),
            username=spec.options.get("username"),
            password=_read_password(spec),
        )

    def open(self) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError as e:
            raise BackendUnavailableError(
                "mqtt sink needs paho-mqtt: pip install 'spade-edge[station]'"
            ) from e
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True
        )
        c.will_set(self.status_topic, payload="offline", qos=1, retain=True)
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        # paho annotates int seconds but only does arithmetic with them (sub-second backoff)
        c.reconnect_delay_set(min_delay=self.backoff[0], max_delay=self.backoff[1])  # type: ignore[arg-type]
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.connect_async(self.host, self.port, keepalive=self.keepalive)
        c.loop_start()  # network thread; retries the first connection too
        self._client = c

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("%s: connect refused: %s", self.name, reason)
            return
        client.publish(self.status_topic, "online", qos=1, retain=True)
        self._connected.set()
        log.info("%s: connected", self.name)
        with self._cond:
            self._cond.notify_all()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self._connected.is_set() and not self._closing:
            log.warning("%s: disconnected (%s); reconnecting with backoff", self.name, reason)
        self._connected.clear()

    @property
    def connected(self) -> bool:
        """True while the broker connection is up."""
        return self._connected.is_set()

    def deliver(self, result: dict[str, Any]) -> bool:
        if not self._connected.wait(timeout=0.5):
            return False
        try:
            payload = json.dumps(result, allow_nan=False, separators=(",", ":"))
        except ValueError as e:  # not strict JSON: never publishable, so do not retry it
            log.error("%s: result %s dropped: %s", self.name, result.get("id"), e)
            return True
        info = self._client.publish(self.result_topic, payload, qos=1, retain=True)
        try:
            info.wait_for_publish(timeout=self.ack_timeout)
        except (RuntimeError, ValueError):  # not connected / queue full: retry after reconnect
            return False
        return bool(info.is_published())

    def retry_delay(self) -> float:
        return 0.05 if self._connected.is_set() else 0.2

    def close(self) -> None:
        c = self._client
        if c is None:
            return
        self._closing = True
        try:
            if self._connected.is_set():
                c.publish(self.status_topic, "offline", qos=1, retain=True).wait_for_publish(1.0)
        except (RuntimeError, ValueError):
            pass
        c.disconnect()
        c.loop_stop()
        self._client = None
