"""ONNX Runtime on the GPU (CUDA or TensorRT execution provider), never silently on the CPU.

Why a separate runner: ONNX Runtime quietly falls back to the CPU when a requested provider is
missing from the installed wheel or fails to initialise (no CUDA/cuDNN libraries). A factory
line that believes it runs on the GPU but runs 20x slower on the CPU is a silent failure, so
this runner asks for explicit providers, checks them against
``onnxruntime.get_available_providers()`` before creating the session and against
``session.get_providers()`` after, and raises :class:`BackendUnavailableError` otherwise.
The CPU provider is still appended last so the few nodes a GPU provider does not implement can
run (ONNX Runtime's normal per-node placement); the session as a whole is on the GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spade_edge.runtime.errors import BackendUnavailableError, InputError
from spade_edge.runtime.runners.ort import OrtRunner

#: short name -> ONNX Runtime provider name (one table; ``provider=`` accepts either form).
GPU_PROVIDERS: dict[str, str] = {
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_INSTALL_HINT = (
    "install onnxruntime-gpu matching your CUDA (pip install onnxruntime-gpu; on Jetson use "
    "NVIDIA's onnxruntime-gpu wheel for JetPack) or choose --backend ort"
)


def resolve_providers(provider: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Full provider names from short names ('cuda', 'tensorrt') or full names, in order."""
    if provider is None:
        provider = ["cuda"]
    names = [provider] if isinstance(provider, str) else list(provider)
    if not names:
        raise InputError("ort-gpu: no execution provider requested")
    full_names = set(GPU_PROVIDERS.values())
    out: list[str] = []
    for n in names:
        full = GPU_PROVIDERS.get(n.lower(), n) if isinstance(n, str) else n
        if full not in full_names:
            choices = ", ".join([*GPU_PROVIDERS, *GPU_PROVIDERS.values()])
            raise InputError(f"ort-gpu: unknown GPU provider {n!r}; choose one of: {choices}")
        if full not in out:
            out.append(full)
    return out


class OrtGpuRunner(OrtRunner):
    """ONNX Runtime with explicit GPU providers; refuses to run if any of them is not active."""

    name = "ort-gpu"
    #: as before this flag existed: not verified concurrently on a GPU here, so callers serialise
    thread_safe = False
    default_providers = ("CUDAExecutionProvider",)

    def __init__(
        self,
        path: str | Path,
        provider: str | list[str] | None = None,
        device: int = 0,
        trt_cache_dir: str | Path | None = None,
        threads: int | None = None,
        max_batch: int | None = None,
    ) -> None:
        import onnxruntime as ort

        requested = resolve_providers(provider)
        available = list(ort.get_available_providers())
        missing = [p for p in requested if p not in available]
        if missing:
            raise BackendUnavailableError(
                f"{Path(path)}: ort-gpu needs {', '.join(missing)} but this ONNX Runtime "
                f"({ort.__version__}) only has {', '.join(available)}; {_INSTALL_HINT}"
            )
        providers: list[Any] = []
        for p in requested:
            opts: dict[str, Any] = {"device_id": int(device)}
            if p == "TensorrtExecutionProvider" and trt_cache_dir is not None:
                opts["trt_engine_cache_enable"] = True
                opts["trt_engine_cache_path"] = str(trt_cache_dir)
            providers.append((p, opts))
        providers.append("CPUExecutionProvider")
        self.requested_providers = requested
        super().__init__(path, providers=providers, threads=threads, max_batch=max_batch)
        inactive = [p for p in requested if p not in self.providers]
        if inactive:
            active = ", ".join(self.providers)
            self.close()
            raise BackendUnavailableError(
                f"{self.path}: ONNX Runtime could not start {', '.join(inactive)} (the session "
                f"fell back to {active}); check the CUDA/cuDNN/TensorRT libraries, or "
                f"{_INSTALL_HINT}"
            )


__all__ = ["GPU_PROVIDERS", "OrtGpuRunner", "resolve_providers"]
