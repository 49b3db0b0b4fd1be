"""Atomic output files: every artifact spade-edge writes appears whole or not at all.

One implementation for models, galleries, engines, PNGs and reports: a temp file in the
destination folder (so the rename is atomic), fsync, permissions as ``open()`` would give
(mkstemp makes 0600), ``os.replace``, then fsync of the folder. On any exception the temp file is
removed and an existing destination is left untouched.

A writer killed with ``kill -9`` cannot remove its temp file, so the temp name records the
writer's PID (``.NAME.PID.XXXXXXXX.tmp``) and the next write of the same target removes temp
files of that target whose writer is gone (or that nobody touched for ``STALE_AFTER_S``).

Also here: the other small rules every artifact shares (file SHA-256, what a SHA-256 hex digest
looks like, the UTC timestamp format).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spade_edge.runtime.errors import InputError, SpadeError

#: A temp file untouched this long is stale even if a process with its writer's PID exists
#: (PIDs are reused; a live writer keeps its file's mtime fresh while it writes).
STALE_AFTER_S = 3600.0
_CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


# ----------------------------------------------------------------------- shared small rules


def is_sha256_hex(value: object) -> bool:
    """True for a SHA-256 hex digest as spade-edge stores them (64 lowercase hex digits):
    model fingerprints, content hashes, blob checksums."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def file_sha256(path: str | Path, error: type[SpadeError] = InputError) -> str:
    """Streaming SHA-256 hex digest of a file's bytes; an OSError becomes ``error``."""
    p = Path(path)
    h = hashlib.sha256()
    try:
        with p.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise error(f"{p}: cannot read file: {e.strerror or e}") from None
    return h.hexdigest()


def utc_timestamp() -> str:
    """Now as ISO-8601 UTC with seconds, e.g. ``2026-12-03T16:30:00Z`` (the ``created`` field
    of every artifact)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def display_name(text: str) -> str:
    """``text`` safe to print: a file name that is not UTF-8 (``os.fsdecode`` keeps its bytes
    as surrogates, which no UTF-8 stream can encode) shows those bytes as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# ----------------------------------------------------------------------------- atomic files


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


def _temp_pattern(name: str, suffix: str) -> re.Pattern[str]:
    """Our temp names for target ``name``: ``.NAME.PID.XXXXXXXX.SUFFIX`` (mkstemp's 8 random
    characters), and ``.NAME.XXXXXXXX.SUFFIX`` of releases before the PID was recorded."""
    return re.compile(
        rf"\.{re.escape(name)}\.(?:(?P<pid>[0-9]{{1,10}})\.)?[a-z0-9_]{{8}}{re.escape(suffix)}"
    )


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists, owned by someone else (or not a PID at all: keep, be safe)
    return True


def stale_temp_files(
    target: str | Path, suffix: str = ".tmp", older_than_s: float = STALE_AFTER_S
) -> list[Path]:
    """Temp files left beside ``target`` by killed writers of ``target`` (ours only).

    Stale means: the exact temp naming pattern of this target, and either its writer's PID is
    not a running process, or nothing touched it for ``older_than_s`` seconds.
    """
    p = Path(target)
    folder = p.parent if str(p.parent) else Path(".")
    pattern = _temp_pattern(p.name, suffix)
    now = time.time()
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for e in entries:
        m = pattern.fullmatch(e.name)
        if m is None:
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if not e.is_file(follow_symlinks=False):
            continue
        pid = m.group("pid")
        old = now - st.st_mtime > older_than_s
        if old or (pid is not None and int(pid) != os.getpid() and not _pid_alive(int(pid))):
            found.append(folder / e.name)
    return found


def remove_stale_temp_files(target: str | Path, suffix: str = ".tmp") -> list[Path]:
    """Remove :func:`stale_temp_files` of ``target`` (best effort); returns what was removed."""
    removed = []
    for t in stale_temp_files(target, suffix):
        with contextlib.suppress(OSError):
            t.unlink()
            removed.append(t)
    return removed


@contextmanager
def atomic_path(
    path: str | Path,
    error: type[SpadeError] = InputError,
    suffix: str = ".tmp",
    make_parents: bool = False,
) -> Iterator[Path]:
    """Reserve a temp file beside ``path`` (failing early if the folder is unwritable) and yield
    it; the caller writes and fsyncs it. On success it replaces ``path``; on error it vanishes.
    Stale temp files of ``path`` left by killed writers are removed first.
    OSErrors become ``error`` naming ``path``."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    try:
        if make_parents:
            folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(p, suffix)
        fd, name = tempfile.mkstemp(prefix=f".{p.name}.{os.getpid()}.", suffix=suffix, dir=folder)
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
