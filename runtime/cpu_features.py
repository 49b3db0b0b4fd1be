"""What matrix units this CPU has, read from the CPU itself (never from a model-name list).

The exact low-precision matcher and the auto-selection decide from these flags: bf16 GEMMs pay
off only with AMX-BF16 or AVX512-BF16, int8 GEMMs only with a dot-product instruction (AMX-INT8,
AVX512-VNNI, AVX-VNNI); without them both formats are emulated in fp32 registers and are slower
than the fp32 BLAS, so the NumPy fp32 matcher stays the choice (nothing gets slower than before).

Sources, in order: ``SPADE_CPU_FLAGS`` (a comma/space list, replaces detection: used to simulate
another CPU, e.g. one without these units), ``/proc/cpuinfo`` (Linux), OpenVINO's
``OPTIMIZATION_CAPABILITIES`` (other systems, when openvino is installed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

#: /proc/cpuinfo flag names of the units that matter here (the kernel's spelling).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
WIDE_FLAGS = ("avx512f", "avx2", "fma")
ENV_FLAGS = "SPADE_CPU_FLAGS"


def _proc_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def _openvino_caps() -> frozenset[str] | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    try:
        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # no CPU plugin: nothing to learn
        return None
    flags: set[str] = set()
    names = {str(c).upper() for c in caps}
    if "BF16" in names:
        flags.add("avx512_bf16")  # OpenVINO reports BF16 only where it has native bf16 kernels
    if "INT8" in names:
        flags.add("avx512_vnni")
    return frozenset(flags)


@lru_cache(maxsize=8)
def _detect(env: str | None) -> tuple[frozenset[str], str]:
    if env is not None:
        return frozenset(f.strip().lower() for f in env.replace(",", " ").split()), ENV_FLAGS
    flags = _proc_cpuinfo()
    if flags is not None:
        return flags, "/proc/cpuinfo"
    caps = _openvino_caps()
    if caps is not None:
        return caps, "openvino OPTIMIZATION_CAPABILITIES"
    return frozenset(), "none (no /proc/cpuinfo, no openvino)"


@dataclass(frozen=True)
class CpuUnits:
    """The matrix units present, and where that was read."""

    flags: frozenset[str]
    source: str

    @property
    def bf16(self) -> bool:
        """Native bf16 dot products (AMX tiles or AVX512-BF16)."""
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def int8(self) -> bool:
        """Native int8 dot products (AMX-INT8, AVX512-VNNI or AVX-VNNI)."""
        return any(f in self.flags for f in INT8_FLAGS)

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags or "amx_int8" in self.flags

    def summary(self) -> dict[str, object]:
        """JSON-able view (what spade-inspect / spade-bench print)."""
        return {
            "source": self.source,
            "matrix_flags": sorted(
                f for f in (*BF16_FLAGS, *INT8_FLAGS, *WIDE_FLAGS) if f in self.flags
            ),
            "bf16": self.bf16,
            "int8": self.int8,
            "amx": self.amx,
        }


def cpu_units(flags: str | None = None) -> CpuUnits:
    """Detect the CPU's matrix units; ``flags`` (or ``$SPADE_CPU_FLAGS``) simulates a CPU."""
    env = flags if flags is not None else os.environ.get(ENV_FLAGS)
    found, source = _detect(env)
    return CpuUnits(found, source)


__all__ = ["BF16_FLAGS", "ENV_FLAGS", "INT8_FLAGS", "CpuUnits", "cpu_units"]
