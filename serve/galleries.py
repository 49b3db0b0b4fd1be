"""Gallery versions of a running station: ``gallery.v0001.bin``, ``gallery.v0002.bin``, ...

Version 1 is the gallery the server was started with (hard-linked or copied into the archive
so a rollback to it works even if the original file changes). Each "this part is good" writes
the union of the current version and the new features as the next version, atomically; the
version table in the archive database records which is current, so a restart serves the same
version as before. A server restarted with a *different* GALLERY file registers that file as a
new version and serves it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.fileio import atomic_path, file_sha256
from spade_edge.runtime.gallery import Gallery, appended, save_gallery
from spade_edge.runtime.scoring import DEFAULT_SIGMA
from spade_edge.runtime.thresholds import DEFAULT_FAR, compute_thresholds
from spade_edge.serve.archive import connect, utc_now
from spade_edge.serve.errors import ConflictError, NotFoundError


@dataclass(frozen=True)
class Version:
    version: int
    path: Path
    created: str
    n_images: int
    thresholds: dict[str, Any] | None
    parent: int | None
    recalibrated: bool
    added: list[Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "file": self.path.name,
            "created": self.created,
            "n_images": self.n_images,
            "thresholds": self.thresholds,
            "parent": self.parent,
            "recalibrated": self.recalibrated,
            "added": self.added,
        }


def version_name(n: int) -> str:
    return f"gallery.v{n:04d}.bin"


class GalleryStore:
    """The version table and files of one archive folder."""

    def __init__(self, folder: Path, db_path: Path) -> None:
        self.folder = folder
        self._con = connect(db_path)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._con.close()

    # -- state --
    def _row(self, r: sqlite3.Row) -> Version:
        return Version(
            version=r["version"],
            path=self.folder / r["file"],
            created=r["created"],
            n_images=r["n_images"],
            thresholds=json.loads(r["thresholds"]) if r["thresholds"] else None,
            parent=r["parent"],
            recalibrated=bool(r["recalibrated"]),
            added=json.loads(r["added"]),
        )

    def versions(self) -> list[Version]:
        rows = self._con.execute("SELECT * FROM gallery_versions ORDER BY version").fetchall()
        return [self._row(r) for r in rows]

    def get(self, version: int) -> Version:
        r = self._con.execute(
            "SELECT * FROM gallery_versions WHERE version=?", (version,)
        ).fetchone()
        if r is None:
            raise NotFoundError(f"no gallery version {version}")
        return self._row(r)

    def current(self) -> Version | None:
        r = self._con.execute("SELECT value FROM meta WHERE key='gallery_current'").fetchone()
        return None if r is None else self.get(int(r["value"]))

    def _next_version(self) -> int:
        r = self._con.execute("SELECT COALESCE(MAX(version), 0) FROM gallery_versions").fetchone()
        return int(r[0]) + 1

    def _register(
        self,
        version: int,
        g: Gallery,
        parent: int | None,
        recalibrated: bool,
        added: Sequence[Any],
        origin: str | None = None,
        origin_sha: str | None = None,
    ) -> Version:
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                self._con.execute(
                    "INSERT OR REPLACE INTO gallery_versions (version, file, created, n_images,"
                    " thresholds, parent, recalibrated, added, origin, origin_sha256)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        version,
                        version_name(version),
                        utc_now(),
                        g.n_images,
                        json.dumps(g.thresholds, allow_nan=False) if g.thresholds else None,
                        parent,
                        int(recalibrated),
                        json.dumps(list(added), allow_nan=False),
                        origin,
                        origin_sha,
                    ),
                )
                self._set_current(version)
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
        return self.get(version)

    def _set_current(self, version: int) -> None:
        self._con.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('gallery_current', ?)",
            (str(version),),
        )

    def set_current(self, version: int) -> Version:
        """Make an existing version current (rollback)."""
        v = self.get(version)
        if not v.path.is_file():
            raise ConflictError(f"gallery version {version}: file {v.path.name} is missing")
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            self._set_current(version)
            self._con.execute("COMMIT")
        return v

    # -- start-up --
    def resume(self, gallery: Path) -> tuple[Version | None, str]:
        """The recorded current version if ``gallery`` (by content) is the file this archive
        was started with before (None otherwise), and the file's SHA-256."""
        sha = file_sha256(gallery)
        cur = self.current()
        origin = self._con.execute(
            "SELECT value FROM meta WHERE key='gallery_origin_sha256'"
        ).fetchone()
        same = origin is not None and origin["value"] == sha
        if cur is not None and same and cur.path.is_file():
            return cur, sha
        return None, sha

    def adopt(self, gallery: Path, sha: str) -> Version:
        """Register ``gallery`` (already validated by the caller) as the next, current version."""
        cur = self.current()
        version = self._next_version()
        dst = self.folder / version_name(version)
        _link_or_copy(gallery, dst)
        with Gallery.open(dst) as g:
            v = self._register(
                version,
                g,
                cur.version if cur else None,
                False,
                [],
                origin=str(gallery),
                origin_sha=sha,
            )
        with self._lock:
            self._con.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('gallery_origin_sha256', ?)",
                (sha,),
            )
        return v

    # -- new versions --
    def add_normal(
        self,
        base: Gallery,
        base_version: int,
        pooled: np.ndarray,
        levels: list[np.ndarray],
        sources: list[dict[str, str]],
        added: list[Any],
        recalibrate: bool,
        far: float | None = None,
    ) -> Version:
        """Write ``base`` + new features as the next version (one atomic write): thresholds
        kept as they are, or recomputed leave-one-out over the whole new gallery."""
        version = self._next_version()
        dst = self.folder / version_name(version)
        data = appended(base, pooled, levels, sources, path=dst)
        data.thresholds = (
            recompute_thresholds(data, base.thresholds, far) if recalibrate else base.thresholds
        )
        save_gallery(dst, data)
        with Gallery.open(dst) as g:
            return self._register(version, g, base_version, recalibrate, added)


def recompute_thresholds(
    g: Any, previous: dict[str, Any] | None, far: float | None = None
) -> dict[str, Any]:
    """Leave-one-out thresholds over the whole gallery ``g`` with the K, sigma and false-alarm
    rate of the ``previous`` thresholds (the gallery's defaults without them)."""
    old = previous or {}
    k_i = int(old.get("k_image", g.default_k))
    k_g = int(old.get("k_gallery", g.default_k))
    sigma = float(old.get("sigma", DEFAULT_SIGMA))
    f = far if far is not None else float(old.get("far", DEFAULT_FAR))
    return compute_thresholds(g, f, k_i, k_g, sigma)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link when possible (no copy of a large file), else an atomic copy."""
    with contextlib.suppress(FileNotFoundError):
        dst.unlink()
    try:
        os.link(src, dst)
        return
    except OSError:
        pass
    with atomic_path(dst) as tmp, src.open("rb") as fi, tmp.open("wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())


__all__ = ["GalleryStore", "Version", "recompute_thresholds", "version_name"]
