"""ONNX Runtime runner (CPU). The reference runner: every other runner is compared with it."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.cpu_features import cpu_units
from spade_edge.runtime.errors import FormatError, InputError
from spade_edge.runtime.model_meta import contract_from_metadata
from spade_edge.runtime.registry import Backend
from spade_edge.runtime.runners.base import Features, check_batch, check_outputs

log = logging.getLogger(__name__)


def int8_dot_saturates() -> bool:
    """True on x86 CPUs where ONNX Runtime's fused int8 kernels can saturate.

    Without VNNI/AMX, ORT computes u8 x s8 products with VPMADDUBSW, whose int16 pair sums
    saturate (ORT's quantization docs). Measured on an AVX2-only EPYC: INT8 Lite0 features fall
    to cosine 0.79 against fp32 (0.98 with exact Q/DQ arithmetic), so int8 models run unfused
    there (see ``OrtRunner``'s ``qdq_fusion``). Other architectures: False.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return not cpu_units().int8


class OrtRunner(Backend):
    """Runs an exported spade-edge ONNX model with ONNX Runtime."""

    name = "ort"
    thread_safe = True  # InferenceSession.run may be called concurrently (ORT's contract)
    default_providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __init__(
        self,
        path: str | Path,
        providers: list[Any] | None = None,
        threads: int | None = None,
        max_batch: int | None = None,
        qdq_fusion: bool | None = None,
    ) -> None:
        """``qdq_fusion``: let ORT fuse Q/DQ pairs into its int8 kernels (fast); False runs
        every Q/DQ node as written with float ops between (exact Q/DQ arithmetic, as TensorRT
        computes it). None: fuse unless this CPU's int8 dot product saturates."""
        import onnxruntime as ort

        self.path = Path(path)
        self.session: Any = None
        if not self.path.is_file():
            raise InputError(f"{self.path}: model file not found")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's pool threads otherwise spin after each run, stealing the cores the matcher's
        # GEMM needs right after inference (spade-bench's end-to-end row shows the effect)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.qdq_fusion = not int8_dot_saturates() if qdq_fusion is None else bool(qdq_fusion)
        if not self.qdq_fusion:  # no effect on fp32/fp16 graphs
            so.add_session_config_entry("session.disable_quant_qdq", "1")
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
        if self.contract.precision == "int8" and not self.qdq_fusion and qdq_fusion is None:
            log.warning(
                "%s: this CPU has no VNNI/AMX int8 dot product, so ONNX Runtime's fused int8 "
                "kernels would saturate; running the Q/DQ graph unfused (exact, slower)",
                self.path,
            )
        self.max_batch = max_batch
        self.providers = self.session.get_providers()
        self._outputs = self.contract.output_names
        check_outputs(self.path, (o.name for o in self.session.get_outputs()), self.contract)

    def infer(self, batch: np.ndarray) -> Features:
        if self.session is None:
            raise InputError(f"{self.path}: runner is closed")
        x = check_batch(batch, self.contract)
        outs = self.session.run(self._outputs, {self.contract.input_name: x})
        levels = [np.asarray(o, dtype=np.float32) for o in outs[:-1]]
        pooled = np.asarray(outs[-1], dtype=np.float32).reshape(len(x), -1)
        return Features(levels=levels, pooled=pooled, batch=len(x))

    def close(self) -> None:
        self.session = None
