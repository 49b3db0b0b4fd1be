"""Result records: strict JSON, CSV rows, and file names that are not UTF-8 kept losslessly."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

from spade_edge.runtime.errors import SpadeError
from spade_edge.runtime.records import (
    CSV_FIELDS,
    clean_text,
    csv_text,
    dumps_record,
    image_path,
    path_fields,
)


def test_non_utf8_names_round_trip_through_json_and_csv(tmp_path: Path) -> None:
    raw = b"part_caf\xe9_\xff.png"  # Latin-1 bytes: not UTF-8
    name = os.fsdecode(raw)  # how Python lists it: lone surrogates
    p = tmp_path / name
    p.write_bytes(b"x")
    rec = {**path_fields(p), "score": 1.5, "error": f"{p}: corrupt"}
    assert rec["image"].endswith("part_caf\\xe9_\\xff.png")  # readable, valid UTF-8
    line = dumps_record(rec)
    line.encode("utf-8")  # no lone surrogates left anywhere
    back = json.loads(line)
    assert image_path(back) == os.fsencode(p)  # the exact bytes of the file
    assert Path(os.fsdecode(image_path(back))).read_bytes() == b"x"
    table = csv_text([back])
    table.encode("utf-8")
    row = next(csv.DictReader(io.StringIO(table)))
    assert list(row) == CSV_FIELDS
    assert image_path(row) == os.fsencode(p)


def test_utf8_names_stay_plain() -> None:
    rec = path_fields("tëst/ok.png")
    assert rec == {"image": "tëst/ok.png"}
    assert image_path(rec) == "tëst/ok.png".encode()
    assert clean_text("a\udcffb") == "a\\xffb"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_json_is_strict(bad: float) -> None:
    with pytest.raises(SpadeError, match=r"x\.png: result holds a non-finite number"):
        dumps_record({"image": "x.png", "score": bad})
