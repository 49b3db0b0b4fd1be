"""GenICam source (harvesters): GigE Vision / USB3 Vision cameras through a GenTL producer.

``genicam:/path/to/producer.cti`` with options ``serial`` (pick a camera; default the first),
``fps`` and ``diff`` (as for ``camera:``), ``name`` (part id prefix). A missing producer file is
an ``InputError`` naming it. Mono8/Mono16, RGB8/BGR8 and Bayer (needs OpenCV) pixel formats.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.errors import BackendUnavailableError, ConfigError, InputError
from spade_edge.station.sources.base import FrameGate, log, opencv, score_frame
from spade_edge.station.spec import Spec

_BAYER = {
    "BayerRG8": "COLOR_BayerRG2RGB",
    "BayerGR8": "COLOR_BayerGR2RGB",
    "BayerBG8": "COLOR_BayerBG2RGB",
    "BayerGB8": "COLOR_BayerGB2RGB",
}


def to_rgb(data: np.ndarray, width: int, height: int, fmt: str) -> np.ndarray:
    """A GenTL buffer component as an RGB (or grey) uint8 image; InputError for other formats."""
    if fmt == "Mono8":
        return data.reshape(height, width).astype(np.uint8, copy=True)
    if fmt in ("Mono10", "Mono12", "Mono16"):
        bits = int(fmt[4:])
        return (data.reshape(height, width) >> (bits - 8)).astype(np.uint8)
    if fmt in ("RGB8", "BGR8"):
        img = data.reshape(height, width, 3).astype(np.uint8, copy=True)
        return img if fmt == "RGB8" else img[..., ::-1].copy()
    if fmt in _BAYER:
        cv2 = opencv(f"pixel format {fmt}")
        return np.asarray(cv2.cvtColor(data.reshape(height, width), getattr(cv2, _BAYER[fmt])))
    raise InputError(f"genicam: unsupported pixel format {fmt!r} (Mono8/16, RGB8, BGR8, Bayer*8)")


class GenICamCamera:
    """One GenICam camera: acquire, gate, score."""

    kind = "genicam"

    def __init__(
        self,
        cti: str | Path,
        *,
        serial: str | None = None,
        fps: float | None = None,
        diff: float | None = None,
        name: str | None = None,
        timeout: float = 1.0,
    ) -> None:
        self.cti = Path(cti)
        self.serial = serial
        self.name = f"genicam:{self.cti}"
        self.part_prefix = name or (serial or "genicam")
        self.gate = FrameGate(fps, diff)
        self.timeout = timeout
        self.frames = 0
        self.scored = 0
        self._h: Any = None
        self._ia: Any = None

    @classmethod
    def from_spec(cls, spec: Spec, *, fps: float | None = None, **_: Any) -> GenICamCamera:
        cti = Path(spec.target).expanduser()
        if not cti.is_file():
            raise InputError(f"source {spec.text!r}: GenTL producer file not found: {cti}")
        if cti.suffix.lower() != ".cti":
            raise ConfigError(f"source {spec.text!r}: {cti} is not a GenTL producer (.cti)")
        diff = spec.number("diff", -1.0, minimum=-1.0)
        return cls(
            cti,
            serial=spec.options.get("serial"),
            fps=spec.number("fps", fps or 0.0) or None,
            diff=None if diff < 0 else diff,
            name=spec.options.get("name"),
        )

    def _open(self) -> None:
        if not self.cti.is_file():
            raise InputError(f"{self.name}: GenTL producer file not found: {self.cti}")
        try:
            from harvesters.core import Harvester
        except ImportError as e:
            raise BackendUnavailableError(
                "genicam source needs harvesters: pip install 'spade-edge[genicam]'"
            ) from e
        h = Harvester()
        try:
            h.add_file(str(self.cti))
            h.update()
            if not h.device_info_list:
                raise InputError(f"{self.name}: the producer found no camera")
            key = {"serial_number": self.serial} if self.serial else None
            try:
                ia = h.create(key) if key else h.create()
            except (ValueError, IndexError) as e:
                raise InputError(f"{self.name}: no camera with serial {self.serial!r}") from e
            ia.start()
        except BaseException:
            h.reset()
            raise
        self._h, self._ia = h, ia

    def _grab(self) -> np.ndarray | None:
        """One frame as RGB/grey, or None when none arrived within the timeout."""
        try:
            buffer = self._ia.fetch(timeout=self.timeout)
        except Exception as e:  # harvesters raises its own TimeoutException
            if type(e).__name__ in ("TimeoutException", "TimeoutError"):
                return None
            raise
        with buffer:
            c = buffer.payload.components[0]
            img = to_rgb(np.asarray(c.data), int(c.width), int(c.height), str(c.data_format))
        self.frames += 1
        return img

    def _close(self) -> None:
        if self._ia is not None:
            try:
                self._ia.stop()
            finally:
                self._ia.destroy()
                self._ia = None
        if self._h is not None:
            self._h.reset()
            self._h = None

    async def run(self, service: Any, max_frames: int | None = None) -> None:
        """Acquire until cancelled (or ``max_frames`` frames, for tests and benches)."""
        await asyncio.to_thread(self._open)
        log.info("%s: acquiring", self.name)
        try:
            while max_frames is None or self.frames < max_frames:
                rgb = await asyncio.to_thread(self._grab)
                if rgb is None or not self.gate.admit(rgb):
                    continue
                part = f"{self.part_prefix}-{self.frames - 1:06d}"
                self.scored += await score_frame(service, rgb, part, "genicam")
        finally:
            await asyncio.to_thread(self._close)
