"""Camera source (OpenCV): video files, RTSP/HTTP streams and USB cameras by index.

``camera:0`` (USB index), ``camera:rtsp://…``, ``camera:/path/clip.mp4``; options ``fps`` (cap
on parts per second: video time for files, wall time for live inputs), ``diff`` (score only on
a settled scene change, see ``FrameGate``) and ``name`` (part ids are ``NAME-FRAMENO``). Frames
are read on a worker thread; a live input that fails is reopened with backoff (1 s doubling to
30 s); a file source ends at its last frame.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from spade_edge.runtime.errors import ConfigError, InputError
from spade_edge.station.sources.base import FrameGate, log, opencv, score_frame
from spade_edge.station.spec import Spec


class Camera:
    """An OpenCV ``VideoCapture`` feeding parts to the service."""

    kind = "camera"

    def __init__(
        self,
        target: str,
        *,
        fps: float | None = None,
        diff: float | None = None,
        name: str | None = None,
    ) -> None:
        self.target = target
        self.is_file = Path(target).is_file()
        self.index = int(target) if target.isdigit() else None
        self.name = f"camera:{target}"
        self.part_prefix = name or (
            Path(target).stem
            if self.is_file
            else f"cam{target}"
            if self.index is not None
            else "cam"
        )
        self.gate = FrameGate(fps, diff)
        self.frames = 0
        self.scored = 0
        self._cap: Any = None

    @classmethod
    def from_spec(cls, spec: Spec, *, fps: float | None = None, **_: Any) -> Camera:
        fps_opt = spec.number("fps", fps or 0.0) or None
        diff = spec.number("diff", -1.0, minimum=-1.0)
        cam = cls(
            spec.target, fps=fps_opt, diff=None if diff < 0 else diff, name=spec.options.get("name")
        )
        if not cam.is_file and cam.index is None and "://" not in spec.target:
            raise ConfigError(f"source {spec.text!r}: not a video file, camera index or stream URL")
        return cam

    def _open(self) -> Any:
        cv2 = opencv("camera source")
        cap = cv2.VideoCapture(self.index if self.index is not None else self.target)
        if not cap.isOpened():
            cap.release()
            raise InputError(f"{self.name}: cannot open (no such camera, stream or video file)")
        return cap

    def _read(self) -> tuple[Any, float] | None:
        """Next frame (RGB) with its time, or None at the end of a file / on a stream error."""
        ok, frame = self._cap.read()
        if not ok or frame is None:
            return None
        self.frames += 1
        if self.is_file:
            vfps = self._cap.get(opencv("camera source").CAP_PROP_FPS) or 0.0
            t = (self.frames - 1) / vfps if vfps > 0 else None
        else:
            t = None
        rgb = frame[..., ::-1] if frame.ndim == 3 else frame
        return rgb, (time.monotonic() if t is None else t)

    async def run(self, service: Any) -> None:
        """Read frames until the file ends (or forever for live inputs, reconnecting)."""
        backoff = 1.0
        while True:
            try:
                self._cap = await asyncio.to_thread(self._open)
            except InputError as e:
                if self.is_file:
                    raise
                log.warning("%s; retrying in %.0fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(30.0, backoff * 2)
                continue
            backoff = 1.0
            try:
                while True:
                    got = await asyncio.to_thread(self._read)
                    if got is None:
                        break
                    rgb, t = got
                    if not self.gate.admit(rgb, t):
                        continue
                    part = f"{self.part_prefix}-{self.frames - 1:06d}"
                    self.scored += await score_frame(service, rgb, part, "camera")
            finally:
                cap, self._cap = self._cap, None
                await asyncio.to_thread(cap.release)
            if self.is_file:
                log.info(
                    "%s: end of file after %d frames (%d scored)",
                    self.name,
                    self.frames,
                    self.scored,
                )
                return
            log.warning("%s: stream lost; reopening", self.name)
            await asyncio.sleep(backoff)
