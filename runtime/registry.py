"""Backend tables: one place that maps a backend name to the module implementing it.

Modules are imported lazily by dotted path so heavy dependencies (tensorrt, pycuda,
onnxruntime-gpu) load only when that backend is chosen. Adding a backend = one table row.
Also the lifecycle every runner and matcher shares (:class:`Backend`) and the one
``"module:attr"`` importer of the project (:func:`import_attr`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from spade_edge.runtime.errors import BackendUnavailableError, ConfigError, InputError


def import_attr(spec: str) -> Any:
    """``"package.module:attr"`` -> the attribute (ImportError/AttributeError propagate)."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"expected 'module:attr', got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def load_backend(table: Mapping[str, str], name: str, kind: str) -> Any:
    """Import ``module:attr`` for ``name`` from ``table``; clear errors for unknown/missing."""
    if name not in table:
        raise InputError(f"unknown {kind} backend {name!r}; choose one of: {', '.join(table)}")
    try:
        return import_attr(table[name])
    except ImportError as e:  # the backend's own dependency is missing
        raise BackendUnavailableError(
            f"{kind} backend {name!r} cannot load here: {e}. "
            "Install the matching extra (e.g. pip install 'spade-edge[trt]')."
        ) from None


def backend_options(cls: type) -> list[str]:
    """Keyword options a backend class accepts: its constructor's after the first argument,
    and, where that constructor forwards ``**options`` to its base class (the matchers'
    ``**knn``), the base constructor's as well."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(vars(klass)["__init__"]).parameters.values())[2:]
        names += [p.name for p in params if p.kind in named and p.name not in names]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return names


def check_options(cls: type, options: Mapping[str, Any], name: str, kind: str) -> None:
    """ConfigError naming the first option ``cls`` does not take (a typo is never ignored)."""
    known = backend_options(cls)
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ConfigError(
            f"{kind} backend {name!r} has no option {unknown[0]!r}; "
            f"its options: {', '.join(known) or 'none'}"
        )


def build_backend(
    table: Mapping[str, str], name: str, kind: str, first: Any, **options: Any
) -> Any:
    """Load backend ``name`` from ``table``, check ``options`` against it, construct it."""
    cls = load_backend(table, name, kind)
    check_options(cls, options, name, kind)
    return cls(first, **options)


class Backend:
    """The lifecycle every runner and matcher shares: constructed = open, ``close()`` frees
    and is idempotent, use after close raises, ``with backend:`` closes on exit.

    Subclasses set ``name`` and ``thread_safe`` (whether one instance may be called from
    several threads at once; the Detector serialises calls otherwise) and implement ``close``.
    """

    name: str
    thread_safe: bool

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "Backend",
    "backend_options",
    "build_backend",
    "check_options",
    "import_attr",
    "load_backend",
]
