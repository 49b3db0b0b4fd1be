"""Sinks against real servers on loopback: mosquitto (incl. a broker restart), asyncua, HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from spade_edge_testing.station_helpers import Mosquitto, free_port, need_binary, wait_until

mqtt = pytest.importorskip("paho.mqtt.client")


def result(i: int, anomalous: bool | None = False) -> dict[str, Any]:
    return {
        "id": i,
        "part_id": f"p{i}",
        "score": 1.0 + i / 100,
        "threshold": 2.0,
        "anomalous": anomalous,
        "time": "2026-12-03T16:00:00Z",
    }


class Subscriber:
    """A persistent-session QoS 1 subscriber: the broker queues for it while it is away."""

    def __init__(self, port: int, topic: str, client_id: str = "test-sub") -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        c.reconnect_delay_set(min_delay=0.1, max_delay=0.5)

        def on_connect(client: Any, *_: Any) -> None:
            client.subscribe(topic, qos=1)
            self.connected.set()

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            with self.lock:
                self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

        c.on_connect = on_connect
        c.on_message = on_message
        c.on_disconnect = lambda *a: self.connected.clear()
        c.connect_async("127.0.0.1", port)
        c.loop_start()
        self.client = c
        wait_until(self.connected.is_set, timeout=10)

    def ids(self, topic: str) -> list[int]:
        with self.lock:
            return [json.loads(p)["id"] for t, p, _ in self.messages if t == topic]

    def payloads(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_mqtt_results_status_retained_and_broker_restart(tmp_path: Path) -> None:
    from spade_edge.station.sinks.mqtt import MqttSink

    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    sink = sub = late = None
    try:
        sub = Subscriber(broker.port, "plant/#")
        sink = MqttSink(
            "127.0.0.1", broker.port, "plant", "st1", buffer=500, backoff_min=0.1, backoff_max=0.5
        )
        sink.start()
        for i in range(1, 21):
            sink.submit(result(i, anomalous=i % 5 == 0))
        wait_until(lambda: set(sub.ids("plant/st1/result")) >= set(range(1, 21)), 15)
        assert sub.ids("plant/st1/result")[:20] == list(range(1, 21))  # in order
        assert b"online" in sub.payloads("plant/st1/status")

        # Broker goes away; 100 verdicts are produced meanwhile; the broker returns.
        broker.stop()
        wait_until(lambda: not sink.connected, 10)
        for i in range(21, 121):
            sink.submit(result(i))
        time.sleep(0.3)
        assert sink.pending == 100  # held, not lost
        broker.start()
        wait_until(lambda: sink.pending == 0, 30)
        wait_until(lambda: set(sub.ids("plant/st1/result")) >= set(range(1, 121)), 30)
        got = sub.ids("plant/st1/result")
        assert set(got) == set(range(1, 121))  # 0 lost within the buffer (duplicates allowed)
        assert sink.dropped == 0

        # The last verdict is retained for a subscriber that arrives later.
        late = Subscriber(broker.port, "plant/st1/#", client_id="late")
        wait_until(lambda: late.ids("plant/st1/result"), 10)
        assert late.ids("plant/st1/result")[-1] == 120
    finally:
        for c in (sub, late):
            if c is not None:
                c.close()
        if sink is not None:
            sink.stop(timeout=2)
        broker.stop()


def test_mqtt_buffer_is_bounded_drops_oldest() -> None:
    from spade_edge.station.sinks.mqtt import MqttSink

    sink = MqttSink("127.0.0.1", free_port(), "p", "s", buffer=10)  # never started: no broker
    for i in range(25):
        sink.submit(result(i))
    assert sink.pending == 10 and sink.dropped == 15
    assert [r["id"] for r in sink._buf] == list(range(15, 25))


def test_mqtt_last_will_offline_when_station_dies(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    sub = proc = None
    try:
        sub = Subscriber(broker.port, "w/#", client_id="will-sub")
        code = (
            "import time\n"
            "from spade_edge.station.sinks.mqtt import MqttSink\n"
            f"s = MqttSink('127.0.0.1', {broker.port}, 'w', 'st9', keepalive=5)\n"
            "s.start()\n"
            "time.sleep(60)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code])
        wait_until(lambda: sub.payloads("w/st9/status")[-1:] == [b"online"], 20)
        proc.kill()  # kill -9: no clean disconnect, so the broker sends the will
        proc.wait(timeout=10)
        wait_until(lambda: sub.payloads("w/st9/status")[-1:] == [b"offline"], 15)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if sub is not None:
            sub.close()
        broker.stop()


def test_opcua_nodes_follow_verdicts() -> None:
    pytest.importorskip("asyncua")
    from asyncua import Client

    from spade_edge.station.sinks.opcua import NAMESPACE, OpcUaSink

    port = free_port()
    sink = OpcUaSink("127.0.0.1", port, "Line1")
    sink.start()
    try:
        sink.set_ready(True)
        for i, bad in ((1, False), (2, True), (3, False)):
            sink.submit(result(i, anomalous=bad))
        wait_until(lambda: sink.pending == 0, 20)

        async def read() -> dict[str, Any]:
            async with Client(f"opc.tcp://127.0.0.1:{port}/spade-edge/", timeout=10) as c:
                idx = await c.get_namespace_index(NAMESPACE)
                out = {}
                for n in (
                    "Ready",
                    "LastPartId",
                    "LastScore",
                    "LastVerdict",
                    "LastResultId",
                    "Counter",
                    "RejectCounter",
                ):
                    out[n] = await c.get_node(f"ns={idx};s=Line1.{n}").read_value()
                return out

        v = asyncio.run(asyncio.wait_for(read(), 30))
        assert v == {
            "Ready": True,
            "LastPartId": "p3",
            "LastScore": pytest.approx(1.03),
            "LastVerdict": "OK",
            "LastResultId": 3,
            "Counter": 3,
            "RejectCounter": 1,
        }
        sink.submit(result(4, anomalous=True))
        wait_until(lambda: sink.pending == 0, 10)
        v = asyncio.run(asyncio.wait_for(read(), 30))
        assert (v["LastVerdict"], v["Counter"], v["RejectCounter"]) == ("NOK", 4, 2)
    finally:
        sink.stop(timeout=2)


class _Hook(BaseHTTPRequestHandler):
    plan: ClassVar[list[int]] = []
    got: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        code = self.plan.pop(0) if self.plan else 200
        if code == 200:
            self.got.append(body)
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a: Any) -> None:
        pass


def test_webhook_retries_then_delivers_in_order() -> None:
    from spade_edge.station.sinks.webhook import WebhookSink

    _Hook.plan = [503, 500, 200, 400]  # two failures then ok; then a 400 is not retried
    _Hook.got = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    sink = WebhookSink(f"http://127.0.0.1:{srv.server_port}/hook", retries=3, backoff=0.01)
    sink.start()
    try:
        sink.submit(result(1))
        sink.submit(result(2))
        sink.submit(result(3))
        wait_until(lambda: sink.pending == 0, 20)
        assert [r["id"] for r in _Hook.got] == [1, 3]  # 2 got a 400: given up, not retried
        assert sink.failed == 1 and sink.delivered == 3
    finally:
        sink.stop(timeout=2)
        srv.shutdown()
        srv.server_close()


def test_webhook_gives_up_after_retries_on_dead_endpoint() -> None:
    from spade_edge.station.sinks.webhook import WebhookSink

    sink = WebhookSink(f"http://127.0.0.1:{free_port()}/x", retries=2, backoff=0.01, timeout=0.5)
    sink.start()
    try:
        sink.submit(result(1))
        wait_until(lambda: sink.failed == 1, 20)
        assert sink.pending == 0
    finally:
        sink.stop(timeout=1)


def test_mqtt_login_with_password_file(tmp_path: Path) -> None:
    from spade_edge.runtime.errors import ConfigError
    from spade_edge.station.sinks import open_sink

    passwd = need_binary("mosquitto_passwd", "mosquitto")
    pw_db = tmp_path / "passwd"
    subprocess.run([passwd, "-c", "-b", str(pw_db), "station", "pa55"], check=True)
    broker = Mosquitto(tmp_path / "broker")
    broker.conf.write_text(
        broker.conf.read_text().replace("allow_anonymous true", "allow_anonymous false")
        + f"password_file {pw_db}\n"
    )
    (tmp_path / "good").write_text("pa55\n")
    (tmp_path / "bad").write_text("nope\n")
    broker.start()
    sinks = []
    try:
        good = open_sink(
            f"mqtt://127.0.0.1:{broker.port}/a?username=station&password_file={tmp_path}/good",
            "s1",
        )
        bad = open_sink(
            f"mqtt://127.0.0.1:{broker.port}/b?username=station&password_file={tmp_path}/bad"
            "&backoff_min=0.1&backoff_max=0.2",
            "s1",
        )
        for s in (good, bad):
            s.start()
            sinks.append(s)
            s.submit(result(1))
        wait_until(lambda: good.pending == 0, 15)
        time.sleep(0.5)
        assert bad.pending == 1 and not bad.connected  # refused: held, not lost
    finally:
        for s in sinks:
            s.stop(timeout=0.5)
        broker.stop()
    with pytest.raises(ConfigError, match="password_file needs username"):
        open_sink(f"mqtt://127.0.0.1:1/a?password_file={tmp_path}/good", "s1")
