"""Remote inference on an NVIDIA Triton Inference Server (tritonclient, gRPC or HTTP).

Two clients, one per model that ``spade-triton`` writes:

- ``TritonRunner`` (backend ``triton`` in RUNNERS) is a Runner like any other: a preprocessed
  batch in, the feature pyramid out, computed by the server's ``spade_backbone`` model (the
  GPU part). The matcher runs where the Detector runs, against the caller's gallery, so the
  Runner protocol means the same for every backend. The server's model announces its contract
  and fingerprint in its config, so a gallery packed with another model is refused as usual.
- ``TritonInspector`` sends encoded image files to the ``spade`` model and gets score, verdict
  and map back: everything on the server, the client needs nothing but the bytes.

Addresses: ``HOST:PORT`` (gRPC), ``grpc://HOST:PORT`` or ``http://HOST:PORT``. Where only a
model path can be given (``spade-serve MODEL --backend triton``), the runner also takes
``[grpc://|http://]HOST:PORT/MODEL``. tritonclient is imported here only (extra ``[triton]``).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from spade_edge.runtime.contract import Contract
from spade_edge.runtime.errors import BackendUnavailableError, FormatError, InputError
from spade_edge.runtime.registry import Backend
from spade_edge.runtime.runners.base import Features, check_batch

PROTOCOLS = ("grpc", "http")
DEFAULT_TIMEOUT_S = 60.0


class TritonRequestError(InputError):
    """The server refused a request (a bad image, a wrong shape): its message says why."""


def parse_url(url: str, protocol: str | None = None) -> tuple[str, str]:
    """``(protocol, "host:port")`` from ``HOST:PORT`` / ``grpc://`` / ``http://`` addresses."""
    scheme, sep, rest = url.partition("://")
    if sep:
        if scheme not in PROTOCOLS:
            raise InputError(f"{url}: scheme must be grpc:// or http://")
        if protocol is not None and protocol != scheme:
            raise InputError(f"{url}: the scheme says {scheme}, the protocol option {protocol}")
        protocol, url = scheme, rest
    protocol = protocol or "grpc"
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol must be grpc or http, got {protocol!r}")
    host, colon, port = url.rstrip("/").rpartition(":")
    if not colon or not host or not port.isdigit():
        raise InputError(f"{url}: expected HOST:PORT")
    return protocol, f"{host}:{port}"


_MODEL_ADDRESS = re.compile(r"^(?:(grpc|http):/+)?([^/:]+:\d+)/([\w.-]+)/?$")


def split_model_address(path: str) -> tuple[str | None, str]:
    """``grpc://h:8001/spade_backbone`` -> ``("grpc://h:8001", "spade_backbone")``; a bare model
    name -> ``(None, name)``. Accepts the single slash ``pathlib.Path`` leaves of ``://``."""
    m = _MODEL_ADDRESS.match(path)
    if m is None:
        return None, path
    scheme, addr, model = m.groups()
    return (f"{scheme}://{addr}" if scheme else addr), model


class _Client:
    """tritonclient for one server: the module (grpc or http), a client, error mapping."""

    def __init__(self, url: str, protocol: str | None, timeout_s: float) -> None:
        self.protocol, self.url = parse_url(url, protocol)
        try:
            if self.protocol == "grpc":
                import tritonclient.grpc as mod
            else:
                import tritonclient.http as mod
            from tritonclient.utils import InferenceServerException
        except ImportError as e:
            raise BackendUnavailableError(
                f"the triton backend needs tritonclient ({e}): pip install 'spade-edge[triton]'"
            ) from None
        self.mod: Any = mod
        self.server_error: type[Exception] = InferenceServerException
        self.timeout_s = float(timeout_s)
        self.client: Any = self._call(mod.InferenceServerClient, self.url)

    def where(self, model: str | None = None) -> str:
        return f"triton {self.protocol}://{self.url}" + (f" model {model}" if model else "")

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except self.server_error as e:
            msg = e.message() if hasattr(e, "message") else str(e)
            status = str(e.status() or "") if hasattr(e, "status") else ""
            if "400" in status or "INVALID_ARG" in status:
                raise TritonRequestError(f"{self.where()}: {msg}") from None
            raise BackendUnavailableError(f"{self.where()}: {msg}") from None
        except (OSError, ConnectionError) as e:
            raise BackendUnavailableError(f"{self.where()}: {e}") from None

    def config(self, model: str, version: str) -> dict[str, Any]:
        ready = self._call(self.client.is_model_ready, model, version)
        if not ready:
            raise BackendUnavailableError(f"{self.where(model)}: not ready (not loaded?)")
        if self.protocol == "grpc":
            cfg = self._call(self.client.get_model_config, model, version, as_json=True)
            cfg = cfg.get("config", cfg)
        else:
            cfg = self._call(self.client.get_model_config, model, version)
        return dict(cfg)

    def infer(self, model: str, version: str, inputs: list[Any], outputs: list[str]) -> Any:
        if self.client is None:
            raise InputError(f"{self.where(model)}: used after close()")
        outs = [self.mod.InferRequestedOutput(n) for n in outputs]
        kw: dict[str, Any] = {"model_version": version, "outputs": outs}
        if self.protocol == "grpc":
            kw["client_timeout"] = self.timeout_s
        return self._call(self.client.infer, model, inputs, **kw)

    def close(self) -> None:
        c, self.client = self.client, None
        if c is not None:
            c.close()


def _param(cfg: dict[str, Any], key: str) -> str | None:
    p = (cfg.get("parameters") or {}).get(key)
    return None if p is None else str(p.get("string_value", ""))


class TritonRunner(Backend):
    """The feature pyramid from a Triton model (``spade_backbone`` by default).

    ``path`` is the Triton model's name, or ``[grpc://|http://]HOST:PORT/MODEL`` (then ``url``
    is not needed); ``url`` the server. Requests are serialised per runner (one client
    connection); open one runner per thread for parallel requests.
    """

    name = "triton"
    thread_safe = False

    def __init__(
        self,
        path: str | Any = "spade_backbone",
        url: str | None = None,
        protocol: str | None = None,
        version: str = "",
        max_batch: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        in_path, self.model = split_model_address(str(path))
        if in_path is not None and url is not None:
            raise InputError(f"{path}: the server is named twice (path and url={url})")
        url = in_path or url or "127.0.0.1:8001"
        self.version = str(version)
        self._c = _Client(url, protocol, timeout_s)
        self._lock = threading.Lock()
        try:
            cfg = self._c.config(self.model, self.version)
            contract_json = _param(cfg, "spade_contract")
            fingerprint = _param(cfg, "spade_fingerprint")
            if not contract_json or not fingerprint:
                raise FormatError(
                    f"{self._c.where(self.model)}: not a spade-edge backbone model (its config "
                    "has no spade_contract/spade_fingerprint parameters; write it with "
                    "spade-triton)"
                )
            self.contract = Contract.from_json(contract_json, self._c.where(self.model))
            self.fingerprint = fingerprint
            server_max = int(cfg.get("max_batch_size", 0) or 0)
        except BaseException:
            self._c.close()
            raise
        self.metadata: dict[str, str] = {}
        limits = [b for b in (max_batch, server_max) if b]
        self.max_batch: int | None = min(limits) if limits else None
        self._outputs = self.contract.output_names

    @property
    def protocol(self) -> str:
        return self._c.protocol

    def infer(self, batch: np.ndarray) -> Features:
        x = check_batch(batch, self.contract)
        step = self.max_batch or len(x)
        parts: list[list[np.ndarray]] = []
        with self._lock:
            for i in range(0, len(x), step):
                chunk = x[i : i + step]
                inp = self._c.mod.InferInput(self.contract.input_name, list(chunk.shape), "FP32")
                inp.set_data_from_numpy(chunk)
                res = self._c.infer(self.model, self.version, [inp], self._outputs)
                parts.append([np.asarray(res.as_numpy(n), dtype=np.float32) for n in self._outputs])
        outs = [
            np.concatenate(col) if len(parts) > 1 else col[0] for col in zip(*parts, strict=True)
        ]
        levels = outs[:-1]
        for lv, arr in zip(self.contract.levels, levels, strict=True):
            if arr.shape != (len(x), lv.height, lv.width, lv.channels):
                raise FormatError(
                    f"{self._c.where(self.model)}: output {lv.name} has shape {arr.shape}"
                )
        return Features(levels=levels, pooled=outs[-1].reshape(len(x), -1), batch=len(x))

    def close(self) -> None:
        self._c.close()


@dataclass
class RemoteResult:
    """What the ``spade`` model returns for one image."""

    score: float
    anomalous: bool | None  # None: the server knows no threshold (ANOMALOUS = -1)
    anomaly_map: np.ndarray  # float32 [S, S], crop geometry

    def to_record(self, source: str) -> dict[str, Any]:
        return {
            "image": source,
            "score": round(float(self.score), 6),
            "anomalous": self.anomalous,
            "map_max": round(float(self.anomaly_map.max()), 6),
        }


class TritonInspector(Backend):
    """Score encoded image files on the server's ``spade`` model (one request per call)."""

    name = "triton-inspector"
    thread_safe = False  # one client connection, as TritonRunner

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        protocol: str | None = None,
        model: str = "spade",
        version: str = "",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.model, self.version = model, str(version)
        self._c = _Client(url, protocol, timeout_s)

    def inspect(self, images: list[bytes]) -> list[RemoteResult]:
        """One request holding ``images`` (a batch); a bad image fails the whole request."""
        if not images:
            return []
        arr = np.empty((len(images), 1), dtype=object)
        for i, b in enumerate(images):
            arr[i, 0] = bytes(b)
        inp = self._c.mod.InferInput("IMAGE", [len(images), 1], "BYTES")
        inp.set_data_from_numpy(arr)
        res = self._c.infer(self.model, self.version, [inp], ["SCORE", "ANOMALOUS", "ANOMALY_MAP"])
        score = res.as_numpy("SCORE").reshape(-1)
        verdict = res.as_numpy("ANOMALOUS").reshape(-1)
        amap = res.as_numpy("ANOMALY_MAP")
        return [
            RemoteResult(float(score[i]), None if verdict[i] < 0 else bool(verdict[i]), amap[i])
            for i in range(len(images))
        ]

    def close(self) -> None:
        self._c.close()


__all__ = [
    "PROTOCOLS",
    "RemoteResult",
    "TritonInspector",
    "TritonRequestError",
    "TritonRunner",
    "parse_url",
    "split_model_address",
]
