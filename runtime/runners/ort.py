"""ONNX Runtime runner (CPU). The reference runner: every other runner is compared with it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.errors import FormatError, InputError
from spade_edge.runtime.model_meta import contract_from_metadata
from spade_edge.runtime.runners.base import Features


class OrtRunner:
    """Runs an exported spade-edge ONNX model with ONNX Runtime."""

    name = "ort"
    default_providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __init__(
        self,
        path: str | Path,
        providers: list[Any] | None = None,
        threads: int | None = None,
        max_batch: int | None = None,
        **_: Any,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: model file not found")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's pool threads otherwise spin after each run, stealing the cores the matcher's
        # GEMM needs right after inference (measured: +95 ms per wrn50 image on 2 cores)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        n = threads or int(os.environ.get("SPADE_ORT_THREADS", "0") or 0)
        if n:
            so.intra_op_num_threads = n
        try:
            self.session = ort.InferenceSession(
                str(self.path), so, providers=providers or list(self.default_providers)
            )
        except Exception as e:
            raise FormatError(
                f"{self.path}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}"
            ) from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.metadata = meta
        self.contract, self.fingerprint = contract_from_metadata(meta, str(self.path))
        self.max_batch = max_batch
        self.providers = self.session.get_providers()
        self._outputs = self.contract.output_names
        got = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self._outputs if n not in got]
        if missing:
            raise FormatError(f"{self.path}: model lacks outputs named in its contract: {missing}")

    def infer(self, batch: np.ndarray) -> Features:
        s = self.contract.image_size
        if batch.ndim != 4 or batch.shape[1:] != (3, s, s):
            raise InputError(f"batch shape {batch.shape} does not match the contract [B,3,{s},{s}]")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        outs = self.session.run(self._outputs, {self.contract.input_name: x})
        levels = [np.asarray(o, dtype=np.float32) for o in outs[:-1]]
        pooled = np.asarray(outs[-1], dtype=np.float32).reshape(len(x), -1)
        return Features(levels=levels, pooled=pooled, batch=len(x))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
