"""What sources share: the service they feed, and the rules for turning frames into parts.

A source is an object with ``name`` and ``async run(service)``; the station starts one task per
source with the app and cancels it on shutdown. Sources call ``service.inspect(...)``, which
archives the verdict before it returns, so sinks and the page see every part a source fed.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import Any, Protocol

import numpy as np
from PIL import Image

from spade_edge.runtime.errors import BackendUnavailableError, InputError

log = logging.getLogger("spade_edge.station")


class Source(Protocol):
    """A running input: ``run`` returns when the input is exhausted (a video file's end)."""

    name: str

    async def run(self, service: Any) -> None: ...


async def score_frame(service: Any, rgb: np.ndarray, part_id: str, source: str) -> bool:
    """Encode one admitted frame and inspect it; a frame the service rejects is logged, not
    fatal (a camera keeps running)."""
    data = await asyncio.to_thread(encode_png, rgb)
    try:
        await service.inspect(data, part_id=part_id, source=source)
    except InputError as e:
        log.warning("%s: frame %s rejected: %s", source, part_id, e)
        return False
    return True


def opencv(needed_for: str) -> Any:
    """OpenCV (the [camera] extra), imported when a camera input first needs it;
    ``BackendUnavailableError`` naming ``needed_for`` when it is not installed."""
    try:
        import cv2  # optional heavy dependency: only camera inputs and Bayer formats use it
    except ImportError as e:
        raise BackendUnavailableError(
            f"{needed_for} needs OpenCV: pip install 'spade-edge[camera]'"
        ) from e
    return cv2


def encode_png(rgb: np.ndarray) -> bytes:
    """Lossless PNG of an RGB (or grey) uint8 frame; fast compression (frames are big)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def thumb(rgb: np.ndarray, size: int = 64) -> np.ndarray:
    """Small grey float thumbnail for frame differencing (noise-robust, cheap)."""
    img = (
        Image.fromarray(np.ascontiguousarray(rgb))
        .convert("L")
        .resize((size, size), Image.Resampling.BOX)
    )
    return np.asarray(img, dtype=np.float32)


class FrameGate:
    """Which frames become parts: an fps cap and an optional frame-difference trigger.

    ``fps``: at most this many parts per second (of video time for files, wall time for live
    inputs). ``diff``: when set, a frame is scored only once the scene differs from the last
    scored frame by at least ``diff`` (mean absolute grey level, 0..255, on a 64x64 thumbnail)
    and has settled (differs from the previous frame by less than ``diff``), so a part moving
    into view is scored once, when it stands still.
    """

    def __init__(self, fps: float | None = None, diff: float | None = None) -> None:
        self.min_interval = 1.0 / fps if fps else 0.0
        self.diff = diff
        self._last_t: float | None = None
        self._last_scored: np.ndarray | None = None
        self._prev: np.ndarray | None = None

    def admit(self, rgb: np.ndarray, t: float | None = None) -> bool:
        """True when this frame (at time ``t`` seconds, default: now) should be scored."""
        now = time.monotonic() if t is None else t
        if self.diff is not None:
            th = thumb(rgb)
            prev, self._prev = self._prev, th
            if self._last_scored is not None:
                changed = float(np.abs(th - self._last_scored).mean()) >= self.diff
                settled = prev is not None and float(np.abs(th - prev).mean()) < self.diff
                if not (changed and settled):
                    return False
        if self._last_t is not None and now - self._last_t < self.min_interval - 1e-9:
            return False
        self._last_t = now
        if self.diff is not None:
            self._last_scored = self._prev
        return True
