"""Start and stop a local ``tritonserver`` (tests, benchmark, trying a repository out).

The ``nvidia-pytriton`` wheel bundles a real Triton Inference Server (2.51) with the Python
backend: the binary in ``pytriton/tritonserver/bin``, its libraries in ``nvidia_pytriton.libs``
and one backend stub per Python version. ``SPADE_TRITONSERVER`` may point at another
``tritonserver`` binary (e.g. ``/opt/tritonserver/bin/tritonserver`` in NVIDIA's container),
whose ``../backends`` is then used as it is.

The server binds 127.0.0.1 only, on free ports; its Python-backend shared-memory regions get a
unique prefix so several servers (several test runs on one machine) never collide.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from spade_edge.runtime.errors import BackendUnavailableError, SpadeError


class TritonServerError(SpadeError):
    """The local tritonserver did not start, or died."""


@dataclass(frozen=True)
class TritonDist:
    """Where a runnable tritonserver and its Python backend live."""

    binary: Path
    backends: Path  # folder holding python/ (libtriton_python.so, utils, the stub)
    libs: Path | None  # extra LD_LIBRARY_PATH entry (the wheel's bundled libraries)
    stub: Path | None  # the stub for this Python version, when it must be put in place


def find_tritonserver() -> TritonDist:
    """Locate a tritonserver: ``SPADE_TRITONSERVER``, else the nvidia-pytriton wheel."""
    env = os.environ.get("SPADE_TRITONSERVER")
    if env:
        b = Path(env)
        if not b.is_file():
            raise BackendUnavailableError(f"SPADE_TRITONSERVER={env}: no such file")
        return TritonDist(b, b.parent.parent / "backends", None, None)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise BackendUnavailableError(
            "no tritonserver: install nvidia-pytriton (numpy<2 venv) or set SPADE_TRITONSERVER"
        )
    root = Path(spec.origin).parent / "tritonserver"
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
    dist = TritonDist(
        binary=root / "bin" / "tritonserver",
        backends=root / "backends",
        libs=root.parent.parent / "nvidia_pytriton.libs",
        stub=stub,
    )
    missing = [p for p in (dist.binary, dist.backends / "python", stub) if not p.exists()]
    if missing:
        raise BackendUnavailableError(f"nvidia-pytriton is incomplete here: missing {missing[0]}")
    return dist


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalTritonServer:
    """A tritonserver child process on loopback; a context manager that always stops it.

    ``explicit=True`` starts it under ``--model-control-mode=explicit`` with ``models`` loaded,
    so new versions are loaded through the repository API without a restart.
    """

    repository: Path
    models: tuple[str, ...] = ("spade",)
    explicit: bool = True
    start_timeout_s: float = 180.0
    extra_args: tuple[str, ...] = ()
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    workdir: Path | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "tritonserver.log"

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except (OSError, AssertionError):
            return ""
        return "\n".join(lines[-n:])

    def _backend_dir(self, dist: TritonDist) -> Path:
        if dist.stub is None:
            return dist.backends
        assert self.workdir is not None
        py = self.workdir / "backends" / "python"
        py.mkdir(parents=True)
        for f in (dist.backends / "python").iterdir():
            if f.is_file():
                (py / f.name).symlink_to(f)
        shutil.copy2(dist.stub, py / "triton_python_backend_stub")
        return py.parent

    def start(self) -> LocalTritonServer:
        dist = find_tritonserver()
        self.workdir = Path(tempfile.mkdtemp(prefix="spade-triton-"))
        backends = self._backend_dir(dist)
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        cmd = [
            str(dist.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--backend-config=python,shm-region-prefix-name=spade{os.getpid()}_{uuid.uuid4().hex[:8]}_",
            "--log-verbose=0",
        ]
        if self.explicit:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={m}" for m in self.models]
        cmd += list(self.extra_args)
        env = dict(os.environ)
        if dist.libs is not None:
            env["LD_LIBRARY_PATH"] = ":".join(
                p for p in (env.get("LD_LIBRARY_PATH"), str(dist.libs)) if p
            )
        # the Python backend stub embeds Python and finds its environment (numpy, spade_edge's
        # dependencies) through the `python3` first on PATH: this interpreter's venv
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TritonServerError(
                    f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise TritonServerError(
            f"tritonserver not ready after {self.start_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Terminate (SIGTERM, then SIGKILL after 30 s) and remove the work folder."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)  # the server and its Python stubs
                p.wait(timeout=30)
        if self.workdir is not None and os.environ.get("SPADE_KEEP_TRITON_LOG") is None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalTritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def load_model(http: str, model: str = "spade", timeout_s: float = 600.0) -> float:
    """Ask a server (HTTP address) to (re)load ``model``; seconds until it answered.

    Under --model-control-mode=explicit Triton loads the newest version, switches requests to
    it once ready and unloads the old one after its in-flight requests finish.
    """
    url = f"http://{http.removeprefix('http://').rstrip('/')}/v2/repository/models/{model}/load"
    req = urllib.request.Request(url, data=b"", method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            r.read()
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace")
        raise BackendUnavailableError(f"{url}: load refused ({e.code}): {body}") from None
    except (urllib.error.URLError, OSError) as e:
        raise BackendUnavailableError(f"{url}: {e}") from None
    return time.perf_counter() - t0


__all__ = [
    "LocalTritonServer",
    "TritonDist",
    "TritonServerError",
    "find_tritonserver",
    "free_port",
    "load_model",
]
