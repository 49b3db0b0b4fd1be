"""Inference runners, chosen from one table (see ``RUNNERS``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spade_edge.runtime.container import ENGINE_MAGIC
from spade_edge.runtime.errors import InputError
from spade_edge.runtime.registry import build_backend
from spade_edge.runtime.runners.base import Features, Runner

#: backend name -> "module:class". Every runner takes (path, **options).
RUNNERS: dict[str, str] = {
    "ort": "spade_edge.runtime.runners.ort:OrtRunner",
    "ort-gpu": "spade_edge.runtime.runners.ort_gpu:OrtGpuRunner",
    "trt": "spade_edge.runtime.runners.trt:TrtRunner",
    "openvino": "spade_edge.runtime.runners.openvino:OpenVinoRunner",
    "openvino-bf16": "spade_edge.runtime.runners.openvino:OpenVinoBf16Runner",
    "openvino-int8": "spade_edge.runtime.runners.openvino:OpenVinoInt8Runner",
    "triton": "spade_edge.runtime.runners.triton:TritonRunner",
}

#: file magic -> backend that ``auto`` picks for it. ONNX files (protobuf) have no magic.
AUTO_BY_MAGIC: dict[bytes, str] = {ENGINE_MAGIC: "trt"}
AUTO_DEFAULT = "ort"


def auto_backend(path: str | Path) -> str:
    """Pick the backend for a model file from its first bytes (engine -> trt, else ort)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        raise InputError(f"{p}: cannot read model file: {e.strerror or e}") from None
    return AUTO_BY_MAGIC.get(head, AUTO_DEFAULT)


def open_runner(path: str | Path, backend: str = "auto", **options: Any) -> Runner:
    """Load a model (ONNX or engine file) with the chosen backend.

    An option the backend does not take is a ConfigError naming it (never silently ignored).
    """
    name = auto_backend(path) if backend == "auto" else backend
    runner: Runner = build_backend(RUNNERS, name, "runner", path, **options)
    return runner


__all__ = ["AUTO_BY_MAGIC", "RUNNERS", "Features", "Runner", "auto_backend", "open_runner"]
