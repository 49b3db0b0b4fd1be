"""OPC UA sink (asyncua): a small server whose variables a PLC polls or subscribes to.

Nodes (string node ids in the namespace ``urn:spade-edge:station``, under an object named after
the station): ``Ready`` (Boolean: the station is up and inspecting), ``LastPartId`` (String),
``LastScore`` (Double), ``LastVerdict`` (String: ``OK``, ``NOK`` or ``UNKNOWN`` without a
threshold), ``LastResultId`` (Int64), ``Counter`` and ``RejectCounter`` (UInt64, since start).
The server runs on its own thread and event loop, so a slow OPC UA client never touches the
serving loop. No security policy beyond ``None``: bind it to the PLC network only.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from spade_edge.runtime.errors import BackendUnavailableError, ConfigError
from spade_edge.station.sinks.base import DEFAULT_BUFFER, BufferedSink, log
from spade_edge.station.spec import Spec, host_port

NAMESPACE = "urn:spade-edge:station"


def verdict_word(result: dict[str, Any]) -> str:
    """``NOK`` for a reject, ``OK`` for a good part, ``UNKNOWN`` when no threshold is known."""
    flag = result.get("anomalous")
    return "UNKNOWN" if flag is None else ("NOK" if flag else "OK")


def check_listen(spec: Spec, host: str, port: int) -> None:
    """Fail with one line before the model loads when the port is taken (checked again by the
    server itself when it starts)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ConfigError(f"sink {spec.text!r}: cannot resolve {host}: {e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ConfigError(
                f"sink {spec.text!r}: cannot listen on {host}:{port} ({e.strerror or e})"
            ) from None


class OpcUaSink(BufferedSink):
    """Serves the last verdict and counters over OPC UA (``opc.tcp://HOST:PORT/spade-edge/``)."""

    kind = "opcua"

    def __init__(self, host: str, port: int, station: str, *, buffer: int = DEFAULT_BUFFER) -> None:
        super().__init__(f"opcua://{host}:{port}", buffer)
        self.host, self.port, self.station = host, port, station
        self.endpoint = f"opc.tcp://{host}:{port}/spade-edge/"
        self.counter = 0
        self.rejects = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_loop: threading.Thread | None = None
        self._server: Any = None
        self._nodes: dict[str, Any] = {}
        self._ua: Any = None

    @classmethod
    def from_spec(cls, spec: Spec, station: str) -> OpcUaSink:
        """``opcua://HOST:PORT`` (port 4840 when omitted)."""
        host, port, _ = host_port(spec, 4840, "opcua://HOST:PORT")
        check_listen(spec, host, port)
        return cls(host, port, station, buffer=spec.integer("buffer", DEFAULT_BUFFER, minimum=1))

    def node_id(self, name: str) -> str:
        """The string node id of one variable, e.g. ``Line1.LastScore`` (in namespace NAMESPACE)."""
        return f"{self.station}.{name}"

    # -- lifecycle ---------------------------------------------------------------------------------
    def open(self) -> None:
        try:
            import asyncua
        except ImportError as e:
            raise BackendUnavailableError(
                "opcua sink needs asyncua: pip install 'spade-edge[station]'"
            ) from e
        self._ua = asyncua
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread_loop = threading.Thread(target=loop.run_forever, name="opcua", daemon=True)
        self._thread_loop.start()
        fut = asyncio.run_coroutine_threadsafe(self._start_server(), loop)
        try:
            fut.result(timeout=60)
        except BaseException:
            self._shutdown_loop()
            raise

    async def _start_server(self) -> None:
        ua = self._ua.ua
        server = self._ua.Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"spade-edge station {self.station}")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace(NAMESPACE)
        obj = await server.nodes.objects.add_object(
            ua.NodeId(self.station, idx), ua.QualifiedName(self.station, idx)
        )
        spec = (
            ("Ready", False, ua.VariantType.Boolean),
            ("LastPartId", "", ua.VariantType.String),
            ("LastScore", 0.0, ua.VariantType.Double),
            ("LastVerdict", "", ua.VariantType.String),
            ("LastResultId", 0, ua.VariantType.Int64),
            ("Counter", 0, ua.VariantType.UInt64),
            ("RejectCounter", 0, ua.VariantType.UInt64),
        )
        for name, value, vtype in spec:
            self._nodes[name] = await obj.add_variable(
                ua.NodeId(self.node_id(name), idx),
                ua.QualifiedName(name, idx),
                ua.Variant(value, vtype),
            )
        try:
            await server.start()
        except OSError as e:
            raise ConfigError(f"opcua sink: cannot listen on {self.endpoint}: {e}") from e
        self._server = server
        log.info("opcua sink serving %s", self.endpoint)

    def set_ready(self, ready: bool) -> None:
        """Publish whether the station is inspecting (``Ready``)."""
        self._call(self._write({"Ready": ready}))

    def deliver(self, result: dict[str, Any]) -> bool:
        anomalous = result.get("anomalous") is True
        score = result.get("score")
        values: dict[str, Any] = {
            "LastPartId": str(result.get("part_id") or ""),
            "LastScore": float(score) if isinstance(score, int | float) else float("nan"),
            "LastVerdict": verdict_word(result),
            "LastResultId": int(result.get("id") or 0),
            "Counter": self.counter + 1,
            "RejectCounter": self.rejects + int(anomalous),
        }
        if not self._call(self._write(values)):
            return False
        self.counter += 1
        self.rejects += int(anomalous)
        return True

    async def _write(self, values: dict[str, Any]) -> None:
        ua = self._ua.ua
        types = {
            "Counter": ua.VariantType.UInt64,
            "RejectCounter": ua.VariantType.UInt64,
            "LastResultId": ua.VariantType.Int64,
            "LastScore": ua.VariantType.Double,
            "Ready": ua.VariantType.Boolean,
        }
        for name, value in values.items():
            vtype = types.get(name, ua.VariantType.String)
            await self._nodes[name].write_value(ua.Variant(value, vtype))

    def _call(self, coro: Any, timeout: float = 10.0) -> bool:
        if self._loop is None or self._server is None:
            coro.close()
            return False
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            fut.result(timeout=timeout)
        except FutureTimeout:
            fut.cancel()
            return False
        return True

    def close(self) -> None:
        if self._server is not None:
            self._call(self._write({"Ready": False}))
            assert self._loop is not None
            try:
                asyncio.run_coroutine_threadsafe(self._server.stop(), self._loop).result(10)
            except Exception:
                log.exception("opcua sink: stop failed")
            self._server = None
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread_loop is not None:
                self._thread_loop.join(timeout=5)
            self._loop.close()
            self._loop = None
