"""Sources at unit level: watch-folder rules, camera on a generated video, GenICam test double.

The inspector here is a stand-in at the ``InspectionService.inspect`` boundary (the real
signature, the runtime's decoder, a record); the watch folder against the real spade-serve
process (kill -9 in the middle of a stream) is in test_station_process.py.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import time
import types
from inspect import signature
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from spade_edge.runtime.errors import InputError
from spade_edge.runtime.preprocess import decode_image
from spade_edge.station.sources.base import FrameGate
from spade_edge.station.sources.watch import WatchFolder

pytest.importorskip("fastapi")  # the service (the [serve] extra) defines what sources may call
from spade_edge.serve.service import InspectionService

SERVICE_INSPECT = signature(InspectionService.inspect)


class Recorder:
    """Takes what ``InspectionService.inspect`` takes (a keyword it does not know fails here
    too), decodes with the runtime's decoder (bad bytes -> ImageDecodeError), records each part.
    """

    def __init__(self) -> None:
        self.parts: list[dict[str, Any]] = []
        self.archive = self

    async def inspect(self, data: bytes, **meta: Any) -> dict[str, Any]:
        call = SERVICE_INSPECT.bind(self, data, **meta)
        call.apply_defaults()
        kw = call.arguments
        img = decode_image(io.BytesIO(data), kw["source_file"] or "<frame>")
        r = {
            "id": len(self.parts) + 1,
            "part_id": kw["part_id"],
            "source": kw["source"],
            "source_file": kw["source_file"],
            "size": img.size,
            "mean": float(np.asarray(img).mean()),
        }
        self.parts.append(r)
        return r

    def find_by_source_file(self, name: str) -> dict[str, Any] | None:
        return next((p for p in self.parts if p["source_file"] == name), None)


def png(value: int = 128, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


async def until(pred: Any, timeout: float = 10.0) -> None:
    """Await ``pred()`` becoming true (bounded in time)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def drive(src: WatchFolder, svc: Recorder, until: Any, timeout: float = 10.0) -> None:
    task = asyncio.create_task(src.run(svc))
    try:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "source did not finish in time"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_watch_scores_once_in_arrival_order_and_sorts_out(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    svc = Recorder()
    src = WatchFolder(d, settle=0.0, poll=0.02)
    names = ["b_second.png", "a_first.png", "c_third.png"]

    async def main() -> None:
        task = asyncio.create_task(src.run(svc))
        try:
            for i, n in enumerate(names):  # rename-in convention, one at a time
                (d / f".{n}").write_bytes(png(10 * i))
                os.replace(d / f".{n}", d / n)
                await until(lambda i=i: len(svc.parts) >= i + 1)
            (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
            (d / "partial.png.tmp").write_bytes(b"half")
            await until((d / "failed" / "broken.png").exists)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert [p["part_id"] for p in svc.parts] == ["b_second", "a_first", "c_third"]
    assert all(p["source"] == "watch" for p in svc.parts)
    assert sorted(p.name for p in (d / "done").iterdir()) == sorted(names)
    err = (d / "failed" / "broken.png.error.txt").read_text()
    assert "broken.png" in err and "corrupt or truncated image" in err  # the decoder says why
    assert (d / "partial.png.tmp").exists()  # temporary names are never taken
    assert src.scored == 3 and src.failed == 1


def test_watch_waits_for_stable_size(tmp_path: Path) -> None:
    svc = Recorder()
    src = WatchFolder(tmp_path, settle=0.3, poll=0.02)
    data = png(200, 64)
    f = tmp_path / "slow.png"

    async def main() -> None:
        task = asyncio.create_task(src.run(svc))
        try:
            with open(f, "wb") as fh:  # written in pieces, pauses shorter than settle
                for i in range(0, len(data), max(1, len(data) // 5)):
                    fh.write(data[i : i + max(1, len(data) // 5)])
                    fh.flush()
                    await asyncio.sleep(0.1)
                    assert not svc.parts, "scored before the file was complete"
            await until(lambda: bool(svc.parts))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert len(svc.parts) == 1 and svc.parts[0]["mean"] == 200.0


def test_watch_restart_skips_archived_and_scores_the_rest(tmp_path: Path) -> None:
    svc = Recorder()
    for n in ("x1.png", "x2.png"):
        (tmp_path / n).write_bytes(png())
    # A previous run archived x1 but died before moving it.
    st = (tmp_path / "x1.png").stat()
    from spade_edge.station.sources.watch import source_key

    svc.parts.append(
        {
            "id": 1,
            "part_id": "x1",
            "source": "watch",
            "source_file": source_key(tmp_path / "x1.png", st.st_size, st.st_mtime_ns),
        }
    )
    src = WatchFolder(tmp_path, settle=0.0, poll=0.02)
    asyncio.run(drive(src, svc, lambda: not list(tmp_path.glob("*.png"))))
    assert [p["part_id"] for p in svc.parts] == ["x1", "x2"]  # x1 not scored twice
    assert src.skipped == 1 and src.scored == 1
    # A camera that reuses a name later: a new file, so scored again.
    (tmp_path / "x1.png").write_bytes(png(7))
    os.utime(tmp_path / "x1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    asyncio.run(drive(src, svc, lambda: len(svc.parts) == 3))
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["x1-1.png", "x1.png", "x2.png"]


def test_watch_gives_up_after_transient_failures(tmp_path: Path) -> None:
    class Busy(Recorder):
        async def inspect(self, data: bytes, **kw: Any) -> dict[str, Any]:
            raise RuntimeError("queue full")

    (tmp_path / "p.png").write_bytes(png())
    src = WatchFolder(tmp_path, settle=0.0, poll=0.01)
    import spade_edge.station.sources.watch as w

    old = w.MAX_ATTEMPTS
    w.MAX_ATTEMPTS = 2
    try:
        asyncio.run(drive(src, Busy(), lambda: (tmp_path / "failed" / "p.png").exists(), 15))
    finally:
        w.MAX_ATTEMPTS = old
    assert (
        "gave up after 2 attempts: queue full"
        in (tmp_path / "failed" / "p.png.error.txt").read_text()
    )


def test_frame_gate_fps_and_difference() -> None:
    g = FrameGate(fps=2.0)
    frame = np.zeros((8, 8, 3), np.uint8)
    assert [g.admit(frame, t / 10) for t in range(11)].count(True) == 3  # t=0, .5, 1.0
    g = FrameGate(diff=20.0)
    empty = np.zeros((32, 32, 3), np.uint8)
    part = empty.copy()
    part[8:24, 8:24] = 255
    seq = [empty, empty, part, part, part, empty, empty, part]
    assert [g.admit(f, i) for i, f in enumerate(seq)] == [
        True,
        False,
        False,
        True,
        False,
        False,
        True,
        False,
    ]  # part appears (scored when settled), leaves (scene change), returns (not yet settled)


def write_video(path: Path, n: int = 40, fps: float = 20.0) -> Path:
    cv2 = pytest.importorskip("cv2")
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    assert w.isOpened()
    for i in range(n):
        frame = np.full((48, 64, 3), 30, np.uint8)
        if 10 <= i < 25:  # a part in view for 15 frames
            frame[10:38, 16:48] = (40, 200, 220)
        w.write(frame)
    w.release()
    return path


def test_camera_video_file_fps_cap(tmp_path: Path) -> None:
    from spade_edge.station.sources import open_source

    video = write_video(tmp_path / "clip.avi")
    svc = Recorder()
    cam = open_source(f"camera:{video}?fps=5&name=cam1")
    asyncio.run(asyncio.wait_for(cam.run(svc), 60))
    assert cam.frames == 40
    # 40 frames at 20 fps = 2 s of video; at most 5 parts/s -> frames 0,4,8,...,36
    assert [p["part_id"] for p in svc.parts] == [f"cam1-{i:06d}" for i in range(0, 40, 4)]
    assert all(p["size"] == (64, 48) and p["source"] == "camera" for p in svc.parts)


def test_camera_difference_trigger(tmp_path: Path) -> None:
    from spade_edge.station.sources import open_source

    video = write_video(tmp_path / "clip.avi")
    svc = Recorder()
    cam = open_source(f"camera:{video}?diff=15")
    asyncio.run(asyncio.wait_for(cam.run(svc), 60))
    # empty scene (first frame), part in view (settled), empty again
    assert [p["part_id"] for p in svc.parts] == ["clip-000000", "clip-000011", "clip-000026"]


def test_camera_errors(tmp_path: Path) -> None:
    from spade_edge.runtime.errors import ConfigError
    from spade_edge.station.sources import open_source

    pytest.importorskip("cv2")
    with pytest.raises(ConfigError, match="not a video file"):
        open_source(f"camera:{tmp_path}/nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(InputError, match="cannot open"):
        asyncio.run(open_source(f"camera:{bad}").run(Recorder()))


# ---------------------------------------------------------------- GenICam (harvesters double)
class _Component:
    def __init__(self, img: np.ndarray, fmt: str) -> None:
        self.data = img.reshape(-1)
        self.height, self.width = img.shape[:2]
        self.data_format = fmt


class _Buffer:
    def __init__(self, comp: _Component) -> None:
        self.payload = types.SimpleNamespace(components=[comp])
        self.queued = False

    def __enter__(self) -> _Buffer:
        return self

    def __exit__(self, *a: Any) -> None:
        self.queued = True  # harvesters re-queues the buffer on exit


class _Acquirer:
    def __init__(self, frames: list[tuple[np.ndarray, str]]) -> None:
        self.frames = list(frames)
        self.started = self.stopped = self.destroyed = False

    def start(self) -> None:
        self.started = True

    def fetch(self, timeout: float = 0) -> _Buffer:
        if not self.frames:
            raise type("TimeoutException", (Exception,), {})("no frame")
        return _Buffer(_Component(*self.frames.pop(0)))

    def stop(self) -> None:
        self.stopped = True

    def destroy(self) -> None:
        self.destroyed = True


def install_fake_harvesters(monkeypatch: pytest.MonkeyPatch, frames: list[Any]) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    class Harvester:
        def __init__(self) -> None:
            self.device_info_list: list[Any] = []
            seen["h"] = self

        def add_file(self, path: str) -> None:
            seen["cti"] = path

        def update(self) -> None:
            self.device_info_list = [types.SimpleNamespace(serial_number="S1")]

        def create(self, key: Any = None) -> _Acquirer:
            if key and key.get("serial_number") != "S1":
                raise ValueError("no such device")
            seen["ia"] = _Acquirer(frames)
            return seen["ia"]

        def reset(self) -> None:
            seen["reset"] = True

    core = types.ModuleType("harvesters.core")
    core.Harvester = Harvester  # type: ignore[attr-defined]
    pkg = types.ModuleType("harvesters")
    pkg.core = core  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "harvesters", pkg)
    monkeypatch.setitem(sys.modules, "harvesters.core", core)
    return seen


def test_genicam_acquires_through_harvesters_api(tmp_path: Path, monkeypatch) -> None:
    from spade_edge.station.sources import open_source

    cti = tmp_path / "producer.cti"
    cti.write_bytes(b"\0")
    mono = np.arange(48 * 64, dtype=np.uint8).reshape(48, 64)
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[..., 0] = 200
    bgr = rgb[..., ::-1].copy()
    seen = install_fake_harvesters(monkeypatch, [(mono, "Mono8"), (rgb, "RGB8"), (bgr, "BGR8")])
    svc = Recorder()
    src = open_source(f"genicam:{cti}?serial=S1&name=g")

    asyncio.run(asyncio.wait_for(src.run(svc, max_frames=3), 30))
    assert seen["cti"] == str(cti) and seen["ia"].started and seen["ia"].destroyed
    assert seen.get("reset") is True
    assert [p["part_id"] for p in svc.parts] == ["g-000000", "g-000001", "g-000002"]
    assert svc.parts[0]["mean"] == pytest.approx(float(mono.mean()))
    assert svc.parts[1]["mean"] == svc.parts[2]["mean"]  # BGR converted to the same RGB


def test_genicam_missing_producer_and_serial(tmp_path: Path, monkeypatch) -> None:
    from spade_edge.station.sources import open_source

    with pytest.raises(InputError, match=r"GenTL producer file not found: .*nope\.cti"):
        open_source(f"genicam:{tmp_path}/nope.cti")
    cti = tmp_path / "p.cti"
    cti.write_bytes(b"\0")
    install_fake_harvesters(monkeypatch, [])
    src = open_source(f"genicam:{cti}?serial=OTHER")
    with pytest.raises(InputError, match="no camera with serial 'OTHER'"):
        asyncio.run(src.run(Recorder(), max_frames=1))
