"""Sources: where parts come from (``--source SPEC``), one module each, chosen from ``SOURCES``."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from spade_edge.station.spec import parse_spec

# kind -> (module, class, option keys); OpenCV/harvesters are imported only when used.
SOURCES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "watch": ("spade_edge.station.sources.watch", "WatchFolder", ("settle", "poll")),
    "camera": ("spade_edge.station.sources.camera", "Camera", ("fps", "diff", "name")),
    "genicam": (
        "spade_edge.station.sources.genicam",
        "GenICamCamera",
        ("serial", "fps", "diff", "name"),
    ),
}


def open_source(text: str, *, fps: float | None = None) -> Any:
    """Build the source a spec names (``fps``: the ``--fps`` cap for camera sources)."""
    spec = parse_spec(text, {k: v[2] for k, v in SOURCES.items()}, "source")
    module, cls, _ = SOURCES[spec.kind]
    return getattr(import_module(module), cls).from_spec(spec, fps=fps)


__all__ = ["SOURCES", "open_source"]
