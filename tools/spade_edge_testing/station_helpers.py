"""Helpers for the station tests and benches: free loopback ports, bounded waits, a real
mosquitto broker (pytest decides: a missing binary skips, a wait that runs out fails)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, step: float = 0.02) -> Any:
    """Poll ``pred`` until truthy (bounded in time); returns its value or fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s: {pred}")
        time.sleep(step)


def need_binary(name: str, package: str) -> str:
    """Path of a Debian binary; skip without it, but fail under CI (.ci/run installs it)."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} missing under CI: .ci/run must apt-get install {package}")
        pytest.skip(f"{name} not installed (apt-get install {package})")
    return path


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Mosquitto:
    """A mosquitto broker on 127.0.0.1:port with on-disk persistence (survives ``restart``)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.exe = need_binary("mosquitto", "mosquitto")
        self.port = port or free_port()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {folder}/\nautosave_interval 1\n"
            f"log_dest file {folder}/mosquitto.log\n" + ("user root\n" if os.geteuid() == 0 else "")
            # as root mosquitto drops to user "mosquitto", which cannot write the test folder
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(lambda: port_open(self.port), timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence db
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        wait_until(lambda: not port_open(self.port), timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


@contextmanager
def mosquitto(folder: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(folder)
    b.start()
    try:
        yield b
    finally:
        b.stop()
