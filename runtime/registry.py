"""Backend tables: one place that maps a backend name to the module implementing it.

Modules are imported lazily by dotted path so heavy dependencies (tensorrt, pycuda,
onnxruntime-gpu) load only when that backend is chosen. Adding a backend = one table row.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from spade_edge.runtime.errors import BackendUnavailableError, InputError


def load_backend(table: Mapping[str, str], name: str, kind: str) -> Any:
    """Import ``module:attr`` for ``name`` from ``table``; clear errors for unknown/missing."""
    if name not in table:
        raise InputError(f"unknown {kind} backend {name!r}; choose one of: {', '.join(table)}")
    module, _, attr = table[name].partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:  # the backend's own dependency is missing
        raise BackendUnavailableError(
            f"{kind} backend {name!r} cannot load here: {e}. "
            "Install the matching extra (e.g. pip install 'spade-edge[trt]')."
        ) from None
    return getattr(mod, attr)
