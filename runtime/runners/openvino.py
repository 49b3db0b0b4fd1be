"""OpenVINO runner (CPU): the runtime Intel line PCs already ship; picks AMX/VNNI kernels itself.

``precision``: ``fp32`` (default; features equal ONNX Runtime's within fp32 tolerance),
``bf16`` (``INFERENCE_PRECISION_HINT=bf16``: AMX / AVX512-BF16 kernels; on a CPU without them
OpenVINO keeps fp32 and ``effective_precision`` says so) or ``int8`` (runs an INT8 Q/DQ model
from ``spade-export --precision int8`` on VNNI/AMX-INT8 kernels; an fp32 model is refused, since
OpenVINO has no hint that quantises by itself). ``spade-eval --backend openvino-bf16`` reports
the accuracy effect. openvino is imported only here (extra ``[openvino]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.errors import BackendUnavailableError, ConfigError, FormatError, InputError
from spade_edge.runtime.model_meta import read_model_info
from spade_edge.runtime.registry import Backend
from spade_edge.runtime.runners.base import Features, check_batch, check_outputs

PRECISIONS = ("fp32", "bf16", "int8")
_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


class OpenVinoRunner(Backend):
    """Runs an exported spade-edge ONNX model with OpenVINO on the CPU."""

    name = "openvino"
    precision = "fp32"
    thread_safe = False  # one infer request; the Detector serialises calls

    def __init__(
        self,
        path: str | Path,
        precision: str | None = None,
        threads: int | None = None,
        max_batch: int | None = None,
    ) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BackendUnavailableError(
                "the openvino backend needs OpenVINO: pip install 'spade-edge[openvino]'"
            ) from None
        prec = precision or self.precision
        if prec not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {prec!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: model file not found")
        info = read_model_info(self.path)  # contract + fingerprint from the ONNX metadata
        self.contract, self.fingerprint = info.contract, info.fingerprint
        self.metadata = info.metadata
        if prec == "int8" and self.contract.precision != "int8":
            raise ConfigError(
                f"{self.path}: --backend openvino-int8 needs an INT8 model "
                f"(this one is {self.contract.precision}); export one with "
                "`spade-export ... --precision int8`"
            )
        self.precision = prec
        self.name = "openvino" if prec == "fp32" else f"openvino-{prec}"
        self.max_batch = max_batch
        core = ov.Core()
        cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINT[prec]}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            model = core.read_model(str(self.path))
            self._compiled = core.compile_model(model, "CPU", cfg)
        except Exception as e:
            raise FormatError(
                f"{self.path}: OpenVINO cannot load it: {str(e).splitlines()[0]}"
            ) from None
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        #: what OpenVINO runs ("bf16" only where the CPU has bf16 units; else "f32")
        self.effective_precision = str(getattr(hint, "to_string", lambda: hint)())
        check_outputs(self.path, (o.get_any_name() for o in self._compiled.outputs), self.contract)
        self._outputs = [self._compiled.output(n) for n in self.contract.output_names]
        self._request = self._compiled.create_infer_request()

    def infer(self, batch: np.ndarray) -> Features:
        if self._request is None:
            raise InputError(f"{self.path}: runner is closed")
        x = check_batch(batch, self.contract)
        res = self._request.infer({self.contract.input_name: x})
        outs = [np.array(res[o], dtype=np.float32) for o in self._outputs]  # own the memory
        pooled = outs[-1].reshape(len(x), -1)
        return Features(levels=outs[:-1], pooled=pooled, batch=len(x))

    def close(self) -> None:
        self._request = None
        self._compiled = None


class OpenVinoBf16Runner(OpenVinoRunner):
    """``--backend openvino-bf16``: bf16 inference precision (AMX / AVX512-BF16)."""

    precision = "bf16"


class OpenVinoInt8Runner(OpenVinoRunner):
    """``--backend openvino-int8``: an INT8 Q/DQ model on VNNI / AMX-INT8 kernels."""

    precision = "int8"


__all__ = ["PRECISIONS", "OpenVinoBf16Runner", "OpenVinoInt8Runner", "OpenVinoRunner"]
