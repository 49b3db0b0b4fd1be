"""Atomic output files: every artifact spade-edge writes appears whole or not at all.

One implementation for models, galleries, engines, PNGs and reports: a temp file in the
destination folder (so the rename is atomic), fsync, permissions as ``open()`` would give
(mkstemp makes 0600), ``os.replace``, then fsync of the folder. On any exception the temp file is
removed and an existing destination is left untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spade_edge.runtime.errors import InputError, SpadeError


def chmod_like_open(path: Path) -> None:
    """Give ``path`` the permissions a plain ``open()`` would (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every filesystem supports it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_path(
    path: str | Path,
    error: type[SpadeError] = InputError,
    suffix: str = ".tmp",
    make_parents: bool = False,
) -> Iterator[Path]:
    """Reserve a temp file beside ``path`` (failing early if the folder is unwritable) and yield
    it; the caller writes and fsyncs it. On success it replaces ``path``; on error it vanishes.
    OSErrors become ``error`` naming ``path``."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    try:
        if make_parents:
            folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix, dir=folder)
        os.close(fd)
    except OSError as e:
        raise error(f"{p}: cannot write to {folder} ({e.strerror or e})") from None
    tmp = Path(name)
    try:
        yield tmp
        chmod_like_open(tmp)
        os.replace(tmp, p)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise error(f"{p}: cannot write ({exc.strerror or exc})") from None
        raise
    fsync_dir(folder)


def write_atomic(
    path: str | Path, data: bytes | bytearray | memoryview, error: type[SpadeError] = InputError
) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, error) as tmp, tmp.open("wb") as f:
        f.write(memoryview(data).cast("B"))
        f.flush()
        os.fsync(f.fileno())
