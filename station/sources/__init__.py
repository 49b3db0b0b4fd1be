"""Sources: where parts come from (``--source SPEC``), one module each, chosen from ``SOURCES``."""

from __future__ import annotations

from typing import Any

from spade_edge.runtime.registry import import_attr
from spade_edge.station.spec import parse_spec

# kind -> ("module:class", option keys); OpenCV/harvesters are imported only when used.
SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "watch": ("spade_edge.station.sources.watch:WatchFolder", ("settle", "poll")),
    "camera": ("spade_edge.station.sources.camera:Camera", ("fps", "diff", "name")),
    "genicam": (
        "spade_edge.station.sources.genicam:GenICamCamera",
        ("serial", "fps", "diff", "name"),
    ),
}


def open_source(text: str, *, fps: float | None = None) -> Any:
    """Build the source a spec names (``fps``: the ``--fps`` cap for camera sources)."""
    spec = parse_spec(text, {k: v[1] for k, v in SOURCES.items()}, "source")
    return import_attr(SOURCES[spec.kind][0]).from_spec(spec, fps=fps)


__all__ = ["SOURCES", "open_source"]
