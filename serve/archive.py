"""The result archive: one SQLite row per verdict, images and maps on disk beside it.

Durability rule: a row is committed (WAL, ``synchronous=FULL``) before the caller is told its
id, so a result the client saw survives ``kill -9`` and power loss. One writer thread owns the
write connection and commits whatever is queued as one transaction (group commit), so many
concurrent verdicts cost one fsync, not one each. Readers use their own connections (WAL lets
them read while the writer writes).

Files per result (``images/<id // 1000>/``): ``<id>.<ext>`` (the bytes as received),
``<id>.map.npy`` (the float16 anomaly map in crop geometry, for overlays) and
``<id>.overlay.png`` (rendered on first request). Retention: ``keep_images`` decides which
results keep files at all; when the files exceed the byte budget, the oldest normal results
lose theirs first, then the oldest others. Rows are never deleted.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.errors import InputError
from spade_edge.runtime.fileio import write_atomic
from spade_edge.serve.errors import NotFoundError

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    part_id TEXT,
    station TEXT,
    source TEXT NOT NULL,
    source_file TEXT,
    score REAL NOT NULL,
    threshold REAL,
    anomalous INTEGER,
    verdict TEXT NOT NULL,
    map_max REAL NOT NULL,
    pixel_threshold REAL,
    defect_fraction REAL,
    regions TEXT NOT NULL,
    latency TEXT NOT NULL,
    model TEXT NOT NULL,
    gallery_version INTEGER NOT NULL,
    geometry TEXT NOT NULL,
    image_file TEXT,
    map_file TEXT,
    overlay_file TEXT,
    file_bytes INTEGER NOT NULL DEFAULT 0,
    image_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS results_anomalous ON results (anomalous, id);
CREATE INDEX IF NOT EXISTS results_source_file ON results (source_file, id);
CREATE INDEX IF NOT EXISTS results_files ON results (id) WHERE image_file IS NOT NULL;
CREATE TABLE IF NOT EXISTS gallery_versions (
    version INTEGER PRIMARY KEY,
    file TEXT NOT NULL,
    created TEXT NOT NULL,
    n_images INTEGER NOT NULL,
    thresholds TEXT,
    parent INTEGER,
    recalibrated INTEGER NOT NULL DEFAULT 0,
    added TEXT NOT NULL DEFAULT '[]',
    origin TEXT,
    origin_sha256 TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

#: Columns returned as the API v1 result (in this order).
RESULT_FIELDS = (
    "id",
    "time",
    "part_id",
    "station",
    "source",
    "source_file",
    "score",
    "threshold",
    "anomalous",
    "map_max",
    "pixel_threshold",
    "defect_fraction",
    "regions",
    "latency_ms",
    "model",
    "gallery_version",
    "image_kept",
)
#: Columns of ``export-results`` (regions and latencies are summarised by their count / left out).
CSV_FIELDS = (
    *(f for f in RESULT_FIELDS if f not in ("regions", "latency_ms", "image_kept")),
    "n_regions",
)
_GROUP = 64  # rows per commit at most


def utc_now() -> str:
    return (
        _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the archive's pragmas (WAL, full sync, busy wait)."""
    if readonly:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        con = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA busy_timeout=10000")
    con.row_factory = sqlite3.Row
    return con


@dataclass
class Pending:
    """A verdict waiting for its commit; ``future`` gets the new row as an API dict."""

    record: dict[str, Any]
    image: bytes | None
    image_ext: str
    amap: np.ndarray | None
    future: Future[dict[str, Any]] = field(default_factory=Future)


def row_to_result(row: sqlite3.Row) -> dict[str, Any]:
    """A stored row as the API v1 result dict (the same dict POST /v1/inspect answered)."""
    anomalous = row["anomalous"]
    return {
        "id": row["id"],
        "time": row["time"],
        "part_id": row["part_id"],
        "station": row["station"],
        "source": row["source"],
        "source_file": row["source_file"],
        "score": row["score"],
        "threshold": row["threshold"],
        "anomalous": None if anomalous is None else bool(anomalous),
        "map_max": row["map_max"],
        "pixel_threshold": row["pixel_threshold"],
        "defect_fraction": row["defect_fraction"],
        "regions": json.loads(row["regions"]),
        "latency_ms": json.loads(row["latency"]),
        "model": row["model"],
        "gallery_version": row["gallery_version"],
        "image_kept": row["image_file"] is not None,
    }


class Archive:
    """SQLite archive of verdicts with a group-committing writer thread."""

    def __init__(
        self,
        folder: str | Path,
        keep_images: str = "all",
        budget_bytes: int = 1 << 30,
    ) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "images").mkdir(exist_ok=True)
        except OSError as e:
            raise InputError(
                f"{self.folder}: cannot create archive folder ({e.strerror})"
            ) from None
        self.db_path = self.folder / "archive.sqlite"
        self.keep_images = keep_images
        self.budget_bytes = budget_bytes
        try:
            self._con = connect(self.db_path)
            self._con.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise InputError(f"{self.db_path}: cannot open archive database ({e})") from None
        self._file_bytes = int(
            self._con.execute("SELECT COALESCE(SUM(file_bytes), 0) FROM results").fetchone()[0]
        )
        self._local = threading.local()
        self._queue: queue.Queue[Pending | threading.Event | None] = queue.Queue()
        self._readers: list[sqlite3.Connection] = []
        self._closed = False
        self._write_lock = threading.Lock()  # the write connection: writer thread + admin calls
        self._thread = threading.Thread(target=self._run, name="spade-archive", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ writing
    def submit(self, p: Pending) -> Future[dict[str, Any]]:
        """Queue a verdict; the future resolves after its row is committed."""
        if self._closed:
            raise RuntimeError("archive is closed")
        self._queue.put(p)
        return p.future

    def _run(self) -> None:
        stop = False
        while not stop:
            item: Pending | threading.Event | None = self._queue.get()
            group: list[Pending] = []
            barriers: list[threading.Event] = []
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    barriers.append(item)
                else:
                    group.append(item)
                if stop or barriers or len(group) >= _GROUP:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if group:
                self._commit(group)
            for b in barriers:
                b.set()

    def _commit(self, group: list[Pending]) -> None:
        written: list[Path] = []
        try:
            with self._write_lock:
                con = self._con
                con.execute("BEGIN IMMEDIATE")
                try:
                    rows = []
                    for p in group:
                        rid, files, nbytes = self._insert(con, p)
                        written.extend(files)
                        rows.append((p, rid, nbytes))
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                self._file_bytes += sum(n for _, _, n in rows)
                results = [self._get(con, rid) for _, rid, _ in rows]
                if self._file_bytes > self.budget_bytes:
                    self._enforce_budget(con)
        except Exception as e:
            for f in written:
                with contextlib.suppress(OSError):
                    f.unlink()
            log.error("archive commit failed: %s", e)
            for p in group:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        for (p, _, _), res in zip(rows, results, strict=True):
            if not p.future.done():
                p.future.set_result(res)

    def _keep(self, anomalous: bool | None) -> bool:
        if self.keep_images == "all":
            return True
        if self.keep_images == "anomalous":
            return anomalous is not False  # unknown verdicts are kept for review too
        return False

    def _insert(self, con: sqlite3.Connection, p: Pending) -> tuple[int, list[Path], int]:
        r = p.record
        anomalous = r["anomalous"]
        cur = con.execute(
            "INSERT INTO results (time, part_id, station, source, source_file, score, threshold,"
            " anomalous, verdict, map_max, pixel_threshold, defect_fraction, regions, latency,"
            " model, gallery_version, geometry, image_sha256)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                r["time"],
                r["part_id"],
                r["station"],
                r["source"],
                r["source_file"],
                r["score"],
                r["threshold"],
                None if anomalous is None else int(anomalous),
                "unknown" if anomalous is None else ("anomalous" if anomalous else "normal"),
                r["map_max"],
                r["pixel_threshold"],
                r["defect_fraction"],
                json.dumps(r["regions"], allow_nan=False),
                json.dumps(r["latency_ms"], allow_nan=False),
                r["model"],
                r["gallery_version"],
                json.dumps(r["geometry"], allow_nan=False),
                r.get("image_sha256"),
            ),
        )
        rid = int(cur.lastrowid or 0)
        files: list[Path] = []
        if p.image is None or not self._keep(anomalous):
            return rid, files, 0
        rel = Path("images") / f"{rid // 1000:06d}"
        (self.folder / rel).mkdir(parents=True, exist_ok=True)
        img_rel = rel / f"{rid}.{p.image_ext}"
        _write_file(self.folder / img_rel, p.image)
        files.append(self.folder / img_rel)
        nbytes = len(p.image)
        map_rel = None
        if p.amap is not None:
            map_rel = rel / f"{rid}.map.npy"
            buf = io.BytesIO()
            np.save(buf, np.asarray(p.amap, dtype=np.float16), allow_pickle=False)
            _write_file(self.folder / map_rel, buf.getvalue())
            files.append(self.folder / map_rel)
            nbytes += buf.getbuffer().nbytes
        con.execute(
            "UPDATE results SET image_file=?, map_file=?, file_bytes=? WHERE id=?",
            (str(img_rel), None if map_rel is None else str(map_rel), nbytes, rid),
        )
        return rid, files, nbytes

    def _enforce_budget(self, con: sqlite3.Connection) -> None:
        """Drop files of the oldest normal results first, then the oldest others."""
        while self._file_bytes > self.budget_bytes:
            rows = con.execute(
                "SELECT id, image_file, map_file, overlay_file, file_bytes FROM results"
                " WHERE image_file IS NOT NULL ORDER BY (anomalous IS NOT 0), id LIMIT 64"
            ).fetchall()
            if not rows:
                self._file_bytes = 0
                return
            freed = 0
            ids = []
            for row in rows:
                for col in ("image_file", "map_file", "overlay_file"):
                    if row[col]:
                        with contextlib.suppress(OSError):
                            (self.folder / row[col]).unlink()
                freed += row["file_bytes"]
                ids.append(row["id"])
                if self._file_bytes - freed <= self.budget_bytes:
                    break
            con.execute("BEGIN IMMEDIATE")
            con.executemany(
                "UPDATE results SET image_file=NULL, map_file=NULL, overlay_file=NULL,"
                " file_bytes=0 WHERE id=?",
                [(i,) for i in ids],
            )
            con.execute("COMMIT")
            self._file_bytes -= freed

    def set_overlay(self, rid: int, rel: str, nbytes: int) -> None:
        """Record a rendered overlay file (counts towards the byte budget)."""
        with self._write_lock:
            self._con.execute(
                "UPDATE results SET overlay_file=?, file_bytes=file_bytes+? WHERE id=?"
                " AND image_file IS NOT NULL",
                (rel, nbytes, rid),
            )
            self._file_bytes += nbytes

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is committed (False on timeout)."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self) -> None:
        """Commit what is queued, stop the writer, close the database."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=60)
        with self._write_lock:
            with contextlib.suppress(sqlite3.Error):
                self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._con.close()
            for con in self._readers:
                con.close()
            self._readers.clear()

    # ------------------------------------------------------------------------------ reading
    def _reader(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = connect(self.db_path, readonly=False)
            self._local.con = con
            with self._write_lock:
                self._readers.append(con)
        return con

    @staticmethod
    def _get(con: sqlite3.Connection, rid: int) -> dict[str, Any]:
        row = con.execute("SELECT * FROM results WHERE id=?", (rid,)).fetchone()
        if row is None:
            raise NotFoundError(f"no result with id {rid}")
        return row_to_result(row)

    def get(self, rid: int) -> dict[str, Any]:
        """One result by id (NotFoundError if there is none)."""
        return self._get(self._reader(), rid)

    def row(self, rid: int) -> sqlite3.Row:
        """The raw row (file names, geometry) for one result."""
        row = self._reader().execute("SELECT * FROM results WHERE id=?", (rid,)).fetchone()
        if row is None:
            raise NotFoundError(f"no result with id {rid}")
        return row

    def query(
        self,
        since_id: int | None = None,
        limit: int = 100,
        anomalous: bool | None = None,
    ) -> list[dict[str, Any]]:
        """Results in increasing id order: after ``since_id``, or the newest ``limit``."""
        where, args = [], []
        if anomalous is not None:
            where.append("anomalous = ?")
            args.append(int(anomalous))
        if since_id is not None:
            where.append("id > ?")
            args.append(since_id)
        sql = "SELECT * FROM results" + (" WHERE " + " AND ".join(where) if where else "")
        if since_id is not None:
            sql += " ORDER BY id ASC LIMIT ?"
            rows = self._reader().execute(sql, (*args, limit)).fetchall()
        else:
            sql += " ORDER BY id DESC LIMIT ?"
            rows = self._reader().execute(sql, (*args, limit)).fetchall()[::-1]
        return [row_to_result(r) for r in rows]

    def find_by_source_file(self, name: str) -> dict[str, Any] | None:
        """The newest result scored from the file ``name`` (restart-safe sources use this)."""
        row = (
            self._reader()
            .execute("SELECT * FROM results WHERE source_file=? ORDER BY id DESC LIMIT 1", (name,))
            .fetchone()
        )
        return None if row is None else row_to_result(row)

    def iter_rows(self, since_id: int = 0) -> Iterator[sqlite3.Row]:
        """Every row after ``since_id`` in id order (bounded memory)."""
        return iter_rows(self._reader(), since_id)

    def counts(self) -> dict[str, int]:
        row = (
            self._reader()
            .execute(
                "SELECT COUNT(*) AS n, COALESCE(SUM(anomalous = 1), 0) AS rejects FROM results"
            )
            .fetchone()
        )
        return {"results": int(row["n"]), "anomalous": int(row["rejects"])}

    @property
    def file_bytes(self) -> int:
        return self._file_bytes


def _write_file(path: Path, data: bytes) -> None:
    """Write beside, then rename (no half file under the final name). Not fsynced: the row is
    what must survive a crash; a file lost to power failure is reported as not kept."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
    os.replace(tmp, path)


def iter_rows(
    con: sqlite3.Connection, since_id: int = 0, chunk: int = 1000
) -> Iterator[sqlite3.Row]:
    last = since_id
    while True:
        rows = con.execute(
            "SELECT * FROM results WHERE id > ? ORDER BY id LIMIT ?", (last, chunk)
        ).fetchall()
        if not rows:
            return
        yield from rows
        last = rows[-1]["id"]


def export_csv(
    folder: str | Path, out: str | Path, since_id: int = 0, write: Callable[..., None] | None = None
) -> int:
    """Write every result after ``since_id`` as CSV (for MES); returns the row count.

    Reads the database read-only, so it can run beside a live server.
    """
    db = Path(folder) / "archive.sqlite"
    if not db.is_file():
        raise InputError(f"{folder}: no spade-serve archive here (archive.sqlite missing)")
    try:
        con = connect(db, readonly=True)
    except sqlite3.Error as e:
        raise InputError(f"{db}: cannot open archive ({e})") from None
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    n = 0
    try:
        for row in iter_rows(con, since_id):
            r = row_to_result(row)
            r["n_regions"] = len(r["regions"])
            w.writerow(["" if r[f] is None else r[f] for f in CSV_FIELDS])
            n += 1
    except sqlite3.DatabaseError as e:
        raise InputError(f"{db}: cannot read archive ({e})") from None
    finally:
        con.close()
    (write or write_atomic)(out, buf.getvalue().encode("utf-8"))
    return n


__all__ = ["CSV_FIELDS", "RESULT_FIELDS", "Archive", "Pending", "export_csv", "row_to_result"]
