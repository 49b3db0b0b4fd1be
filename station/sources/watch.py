"""Watch-folder source: the camera software drops image files into DIR; each is scored once.

Completeness (documented in docs/station.md): a file is taken once its size and mtime have not
changed for ``settle`` seconds (default 0.3), or at once with ``settle=0`` when the camera
software follows the rename-in convention (write ``.NAME`` or ``NAME.tmp``/``.part``, then
rename to ``NAME``: hidden and temporary names are never taken). Files are scored one at a time
in arrival order (the moment each became complete; ties by mtime, then name); ``part_id`` is
the file's stem. Afterwards the file moves to ``DIR/done/``, or to ``DIR/failed/`` beside a
``NAME.error.txt`` saying why.

Restart-safe through the archive: each file is archived with a key made of its path, size and
mtime (``source_file``). A file still in DIR whose key is archived (the process died between
the archive commit and the move) is moved to done/ without scoring; one that is not archived is
scored. A camera that reuses names is fine: a new file under an old name has a new mtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spade_edge.runtime.errors import ConfigError, InputError
from spade_edge.station.sources.base import log
from spade_edge.station.spec import Spec

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".error.txt")
MAX_ATTEMPTS = 5  # transient failures (service busy/stopping) before a file goes to failed/


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    changed_at: float
    order: int


def source_key(path: Path, size: int, mtime_ns: int) -> str:
    """The archive key of one dropped file: unique per file even when names are reused."""
    return f"{path.resolve()}#{size}-{mtime_ns}"


def _unique(dest_dir: Path, name: str) -> Path:
    dest = dest_dir / name
    stem, suffix = Path(name).stem, Path(name).suffix
    n = 1
    while dest.exists() or dest.with_name(dest.name + ".error.txt").exists():
        dest = dest_dir / f"{stem}-{n}{suffix}"
        n += 1
    return dest


class WatchFolder:
    """``watch:DIR[?settle=S&poll=S]``: see the module docstring."""

    kind = "watch"

    def __init__(self, directory: str | Path, *, settle: float = 0.3, poll: float = 0.1) -> None:
        self.dir = Path(directory)
        self.name = f"watch:{self.dir}"
        self.settle = settle
        self.poll = poll
        self.done_dir = self.dir / "done"
        self.failed_dir = self.dir / "failed"
        self.scored = 0
        self.failed = 0
        self.skipped = 0  # already archived (restart after a crash)
        self._seen: dict[str, _Seen] = {}
        self._attempts: dict[str, int] = {}
        self._order = 0

    @classmethod
    def from_spec(cls, spec: Spec, **_: Any) -> WatchFolder:
        path = Path(spec.target).expanduser()
        if not path.is_dir():
            raise ConfigError(f"source {spec.text!r}: {path} is not a directory")
        return cls(
            path,
            settle=spec.number("settle", 0.3),
            poll=spec.number("poll", 0.1, minimum=0.01),
        )

    # -- scanning ----------------------------------------------------------------------------------
    def _scan(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        with os.scandir(self.dir) as it:
            for e in it:
                n = e.name
                if n.startswith(".") or n.lower().endswith(IGNORED_SUFFIXES):
                    continue
                try:
                    if not e.is_file(follow_symlinks=False):
                        continue
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                out[n] = (st.st_size, st.st_mtime_ns)
        return out

    def ready(self, now: float | None = None) -> list[str]:
        """Poll once; names complete now, in arrival order (blocking: call in a thread)."""
        now = time.monotonic() if now is None else now
        current = self._scan()
        for gone in set(self._seen) - set(current):
            del self._seen[gone]
        for n, (size, mtime) in current.items():
            s = self._seen.get(n)
            if s is None:
                self._order += 1
                self._seen[n] = _Seen(size, mtime, now, self._order)
            elif (s.size, s.mtime_ns) != (size, mtime):
                s.size, s.mtime_ns, s.changed_at = size, mtime, now
        due = [
            (s.changed_at if self.settle else 0.0, s.mtime_ns, s.order, n)
            for n, s in self._seen.items()
            if now - s.changed_at >= self.settle
        ]
        # Arrival = when a file became complete; for rename-in (settle=0) the scan order itself.
        return [n for *_, n in sorted(due)]

    # -- the loop --------------------------------------------------------------------------------
    async def run(self, service: Any) -> None:
        """Poll forever (until cancelled); score complete files one at a time."""
        await asyncio.to_thread(self._prepare)
        log.info("%s: watching (settle %.2fs, poll %.2fs)", self.name, self.settle, self.poll)
        while True:
            for name in await asyncio.to_thread(self.ready):
                await self.handle(service, name)
            await asyncio.sleep(self.poll)

    def _prepare(self) -> None:
        self.done_dir.mkdir(exist_ok=True)
        self.failed_dir.mkdir(exist_ok=True)

    async def handle(self, service: Any, name: str) -> None:
        """Score one complete file (or skip it when its verdict is already archived)."""
        path = self.dir / name
        seen = self._seen.get(name)
        if seen is None:
            return
        key = source_key(path, seen.size, seen.mtime_ns)
        archive = getattr(service, "archive", None)
        if archive is not None and await asyncio.to_thread(archive.find_by_source_file, key):
            self.skipped += 1
            await asyncio.to_thread(self._move, name, self.done_dir, None)
            return
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            self._seen.pop(name, None)
            return
        try:
            await service.inspect(data, part_id=Path(name).stem, source="watch", source_file=key)
        except InputError as e:  # the file itself is bad: never retry it
            self.failed += 1
            await asyncio.to_thread(self._move, name, self.failed_dir, f"{name}: {e}")
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # service busy or stopping: retry, then give up
            n = self._attempts.get(key, 0) + 1
            self._attempts[key] = n
            log.warning("%s: %s: attempt %d failed: %s", self.name, name, n, e)
            if n >= MAX_ATTEMPTS:
                self.failed += 1
                self._attempts.pop(key, None)
                await asyncio.to_thread(
                    self._move, name, self.failed_dir, f"{name}: gave up after {n} attempts: {e}"
                )
            else:
                await asyncio.sleep(min(5.0, 0.2 * 2**n))
            return
        self._attempts.pop(key, None)
        self.scored += 1
        await asyncio.to_thread(self._move, name, self.done_dir, None)

    def _move(self, name: str, dest_dir: Path, error: str | None) -> None:
        src = self.dir / name
        dest = _unique(dest_dir, name)
        if error is not None:
            tmp = dest.with_name(f".{dest.name}.error.txt.tmp")
            tmp.write_text(error.rstrip() + "\n", encoding="utf-8")
            os.replace(tmp, dest.with_name(dest.name + ".error.txt"))
        with contextlib.suppress(FileNotFoundError):
            os.replace(src, dest)
        self._seen.pop(name, None)
