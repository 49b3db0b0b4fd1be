"""``--backend auto`` / ``--matcher auto``: the fastest exact combination this CPU supports.

Exact means fp32 features and a matcher whose nearest distances equal the NumPy oracle's. The
decision reads the CPU's matrix units (runtime/cpu_features.py: flags, never a model list):

- matcher: bf16 units (AMX-BF16 / AVX512-BF16) and OpenVINO installed -> ``exact-bf16``;
  int8 dot-product units (AMX-INT8 / AVX512-VNNI / AVX-VNNI) -> ``exact-int8`` (ONNX Runtime,
  always installed); neither -> ``numpy`` (the fp32 oracle; on such CPUs int8/bf16 are emulated
  and slower, so nothing gets slower than before).
- backend: engine files -> ``trt``; ONNX -> ``ort`` (fp32, the reference runner; OpenVINO's fp32
  was slower in our measurements, and its bf16/int8 change the features: opt in explicitly).

Measurements behind these rules: docs/cpu.md.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spade_edge.runtime.cpu_features import CpuUnits, cpu_units
from spade_edge.runtime.runners import auto_backend


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class Selection:
    """What ``auto`` resolved to, and why (printed by spade-inspect/-bench, put in JSON)."""

    backend: str
    matcher: str
    reason: str
    cpu: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_matcher(units: CpuUnits | None = None) -> tuple[str, str]:
    """(matcher name, reason) for ``--matcher auto``."""
    u = units or cpu_units()
    if u.bf16 and _has("openvino"):
        return "exact-bf16", "bf16 matrix units present: bf16 candidates + exact fp32 re-rank"
    if u.int8:
        return "exact-int8", "int8 dot-product units present: int8 candidates + exact re-rank"
    why = "no bf16/int8 matrix units" if not (u.bf16 or u.int8) else "openvino not installed"
    return "numpy", f"{why}: fp32 BLAS (the oracle)"


def select_backend(model: str | Path | None = None) -> tuple[str, str]:
    """(runner name, reason) for ``--backend auto``."""
    if model is not None:
        name = auto_backend(model)
        if name != "ort":
            return name, "engine file"
    return "ort", "fp32 features (exact); ONNX Runtime is the fastest fp32 runner measured"


def select(model: str | Path | None = None, units: CpuUnits | None = None) -> Selection:
    """Resolve both ``auto`` choices for this CPU (and this model file, when given)."""
    u = units or cpu_units()
    backend, why_b = select_backend(model)
    matcher, why_m = select_matcher(u)
    return Selection(backend, matcher, f"runner: {why_b}; matcher: {why_m}", u.summary())


__all__ = ["Selection", "select", "select_backend", "select_matcher"]
