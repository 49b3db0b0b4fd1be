"""Result records on disk and on the wire: strict JSON lines and CSV rows, lossless file names.

On Linux a file name is bytes and need not be UTF-8; Python hands such names around as ``str``
with lone surrogates (``os.fsdecode``), which neither JSON consumers nor UTF-8 files accept.
A record therefore names its image twice when it has to (docs/reliability.md):

- ``image``: always valid UTF-8 text for people; bytes that are not UTF-8 appear as ``\\xNN``.
- ``image_b64``: only when the name is not valid UTF-8: base64 of the exact bytes
  (``os.fsencode``), so ``image_path(record)`` gives back the very file.

Every other string (error messages quote file names) is made UTF-8-clean the same way, and
JSON is strict (``allow_nan=False``): a non-finite number is refused, never written as ``NaN``.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from spade_edge.runtime.errors import SpadeError

#: Columns of the CSV table (one row per image); ``image_b64`` is empty for UTF-8 names.
CSV_FIELDS = [
    "image",
    "image_b64",
    "score",
    "threshold",
    "anomalous",
    "map_max",
    "defect_fraction",
    "error",
]


def clean_text(s: str) -> str:
    """UTF-8-encodable text: lone surrogates (undecodable name bytes) become ``\\xNN``."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def path_fields(path: str | bytes | os.PathLike[Any], key: str = "image") -> dict[str, str]:
    """``{key: text}`` plus ``{key}_b64`` (the raw bytes) when the name is not valid UTF-8."""
    raw = os.fsencode(path)
    try:
        return {key: raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {
            key: raw.decode("utf-8", "backslashreplace"),
            f"{key}_b64": base64.b64encode(raw).decode("ascii"),
        }


def image_path(record: Mapping[str, Any], key: str = "image") -> bytes:
    """The exact file name bytes a record refers to (inverse of ``path_fields``)."""
    b64 = record.get(f"{key}_b64")
    if b64:
        return base64.b64decode(b64)
    return str(record[key]).encode("utf-8")


def _clean(v: Any) -> Any:
    if isinstance(v, str):
        return clean_text(v)
    if isinstance(v, Mapping):
        return {clean_text(str(k)): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def dumps_record(record: Mapping[str, Any]) -> str:
    """One strict JSON line (no ``NaN``/``Infinity``; UTF-8-clean strings)."""
    try:
        return json.dumps(_clean(record), allow_nan=False)
    except ValueError as e:  # a non-finite float
        name = clean_text(str(record.get("image", "?")))
        raise SpadeError(f"{name}: result holds a non-finite number ({e})") from None


def csv_text(records: Iterable[Mapping[str, Any]], fields: list[str] | None = None) -> str:
    """A CSV table (header + one row per record) over ``fields`` (default ``CSV_FIELDS``)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields or CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(_clean(dict(r)) for r in records)
    return buf.getvalue()
