"""The generic artifact container: round trips, atomic writes and refusal of every bad file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from fuzz_gallery import HEADER_FIELDS, set_header_field, split, with_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spade_edge.runtime import container as ct
from spade_edge.runtime.container import (
    ANY_VERSION,
    HEADER_SIZE,
    peek_magic,
    read_container,
    write_container,
)
from spade_edge.runtime.errors import FormatError, InputError

MAGIC = b"SPADETST"


def _blobs() -> dict[str, np.ndarray | bytes]:
    rng = np.random.default_rng(1)
    return {
        "f16": rng.normal(size=(3, 4, 5)).astype(np.float16),
        "f32": rng.normal(size=(7,)).astype(np.float32),
        "raw": b"\x00\x01plan bytes\xff",
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.array(2.5, np.float64),
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "strided": np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::2],
        "flags": np.array([True, False, True]),
    }


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    p = tmp_path / "a.bin"
    write_container(p, MAGIC, 3, {"hello": "world", "n": [1, 2]}, _blobs())
    return p


def test_round_trip_values_dtypes_shapes(sample: Path) -> None:
    src = _blobs()
    with read_container(sample, MAGIC, {3}, verify=True) as c:
        assert c.version == 3
        assert c.manifest == {"hello": "world", "n": [1, 2]}
        assert list(c.blob_info) == list(src)
        for name, v in src.items():
            got = c.blob(name)
            want = np.frombuffer(v, np.uint8) if isinstance(v, bytes) else np.asarray(v)
            assert got.shape == want.shape, name
            assert got.dtype == want.dtype.newbyteorder("<"), name
            np.testing.assert_array_equal(got, want)
            assert not got.flags.writeable
            info = c.blob_info[name]
            assert info.offset % 4096 == 0
            assert info.sha256 == hashlib.sha256(got.tobytes()).hexdigest()


def test_bytes_blob_is_uint8_1d_and_zero_copy(sample: Path) -> None:
    with read_container(sample, MAGIC, (3,)) as c:
        raw = c.blob("raw")
        assert raw.dtype == np.uint8 and raw.ndim == 1
        assert bytes(raw) == b"\x00\x01plan bytes\xff"
        assert raw.base is not None  # a view of the mapping, not a copy


def test_writing_is_deterministic_and_aligned(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    write_container(a, MAGIC, 1, {"z": 1, "a": 2}, _blobs(), alignment=64)
    write_container(b, MAGIC, 1, {"a": 2, "z": 1}, _blobs(), alignment=64)
    assert a.read_bytes() == b.read_bytes()
    with read_container(a, MAGIC, {1}) as c:
        assert c.alignment == 64
        assert all(i.offset % 64 == 0 for i in c.blob_info.values())


def test_no_blobs(tmp_path: Path) -> None:
    p = tmp_path / "e.bin"
    write_container(p, MAGIC, 1, {}, {})
    assert p.stat().st_size == 4096
    with read_container(p, MAGIC, {1}, verify=True) as c:
        assert c.blob_info == {}
        with pytest.raises(FormatError, match="no blob named 'x'"):
            c.blob("x")


def test_arrays_outlive_close(sample: Path) -> None:
    c = read_container(sample, MAGIC, {3})
    a = c.blob("f32")
    want = a.copy()
    c.close()
    np.testing.assert_array_equal(a, want)
    with pytest.raises(FormatError, match="closed"):
        c.blob("f32")


def test_verify_detects_flipped_blob_byte(sample: Path) -> None:
    data = bytearray(sample.read_bytes())
    with read_container(sample, MAGIC, {3}) as c:
        off = c.blob_info["f32"].offset
    data[off + 3] ^= 0x10
    sample.write_bytes(bytes(data))
    read_container(sample, MAGIC, {3}).close()  # headers are fine: opens without verify
    with pytest.raises(FormatError, match=r"blob 'f32' is corrupt") as e:
        read_container(sample, MAGIC, {3}, verify=True)
    assert str(sample) in str(e.value)


@pytest.mark.parametrize("when", ["write", "fsync", "replace"])
def test_atomic_write_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    p = tmp_path / "out.bin"
    p.write_bytes(b"previous")

    def boom(*a: object, **k: object) -> None:
        raise KeyboardInterrupt  # even an interrupt must not leave a partial file

    if when == "write":
        bad = {"ok": np.zeros(10, np.float32), "bad": np.zeros(4, np.float32)}
        real = ct._as_blob
        calls = {"n": 0}

        def flaky(name, value, path):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 2:
                boom()
            return real(name, value, path)

        monkeypatch.setattr(ct, "_as_blob", flaky)
        blobs = bad
    else:
        monkeypatch.setattr(ct.os, "fsync" if when == "fsync" else "replace", boom)
        blobs = {"ok": np.zeros(10, np.float32)}
    with pytest.raises(KeyboardInterrupt):
        write_container(p, MAGIC, 1, {}, blobs)
    assert p.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_unwritable_destination_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing"):
        write_container(tmp_path / "missing" / "x.bin", MAGIC, 1, {}, {})


def test_writer_refuses_bad_inputs(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    with pytest.raises(FormatError, match="dtype"):
        write_container(p, MAGIC, 1, {}, {"o": np.array([object()])})
    with pytest.raises(FormatError, match="JSON"):
        write_container(p, MAGIC, 1, {"nan": float("nan")}, {})
    with pytest.raises(FormatError, match="alignment"):
        write_container(p, MAGIC, 1, {}, {}, alignment=100)
    with pytest.raises(FormatError, match="magic"):
        write_container(p, b"SHORT", 1, {}, {})
    assert not p.exists()


# --------------------------------------------------------------------- refusing bad files


def test_missing_file_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_container(tmp_path / "nope.bin", MAGIC, {1})


@pytest.mark.parametrize(
    ("head", "says"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "PNG image"),
        (b"\x08\x07\x12\x07pytorch" + b"\0" * 100, "ONNX model"),
        (b"SPADEGAL" + b"\0" * 100, "spade-edge gallery"),
        (b"", "is empty"),
        (b"hello world, not an artifact", "not a spade-edge artifact"),
    ],
)
def test_unknown_magic_says_what_the_file_looks_like(
    tmp_path: Path, head: bytes, says: str
) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(head)
    with pytest.raises(FormatError, match=says) as e:
        read_container(p, b"SPADEENG", {1})
    assert str(p) in str(e.value) and "engine" in str(e.value)
    assert peek_magic(p) == head[:8]


def test_wrong_version_names_supported(sample: Path) -> None:
    with pytest.raises(FormatError, match=r"version 3 is not supported .*reads: 1, 2"):
        read_container(sample, MAGIC, {1, 2})
    with read_container(sample, MAGIC, ANY_VERSION) as c:
        assert c.version == 3


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(field=st.sampled_from(HEADER_FIELDS), data=st.data())
def test_every_header_field_corrupted_is_format_error(sample: Path, field, data) -> None:  # type: ignore[no-untyped-def]
    name, off, size = field
    orig = sample.read_bytes()
    value = data.draw(
        st.binary(min_size=size, max_size=size).filter(lambda v: v != orig[off : off + size])
    )
    bad = sample.with_name("bad.bin")
    bad.write_bytes(set_header_field(orig, name, value))
    with pytest.raises(FormatError) as e:
        read_container(bad, MAGIC, {3}).close()
    assert str(bad) in str(e.value)


def _boundaries(path: Path) -> list[int]:
    """Every 'offset class': inside/at the end of each header field, the manifest, the
    padding, each blob's start/end."""
    data = path.read_bytes()
    _, table, start = split(data)
    mlen = len(json.dumps(table, sort_keys=True, separators=(",", ":")))
    cuts = {0, 1, 7, 8, 11, 12, 15, 16, 23, 24, 55, HEADER_SIZE, HEADER_SIZE + 1}
    cuts |= {HEADER_SIZE + mlen - 1, HEADER_SIZE + mlen, HEADER_SIZE + mlen + 1, start - 1, start}
    for b in table["blobs"]:
        cuts |= {b["offset"] - 1, b["offset"], b["offset"] + 1, b["offset"] + b["nbytes"] - 1}
    return sorted(c for c in cuts if 0 <= c < len(data))


def test_truncation_at_every_offset_class(sample: Path) -> None:
    data = sample.read_bytes()
    bad = sample.with_name("cut.bin")
    cuts = _boundaries(sample)
    assert len(cuts) > 25
    for cut in cuts:
        bad.write_bytes(data[:cut])
        with pytest.raises(FormatError, match=r"truncated|not a|empty"):
            read_container(bad, MAGIC, {3}).close()


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frac=st.floats(0.0, 1.0, exclude_max=True))
def test_truncation_anywhere(sample: Path, frac: float) -> None:
    data = sample.read_bytes()
    bad = sample.with_name("cut.bin")
    bad.write_bytes(data[: int(frac * len(data))])
    with pytest.raises(FormatError):
        read_container(bad, MAGIC, {3}).close()


def test_trailing_bytes_refused(sample: Path) -> None:
    sample.write_bytes(sample.read_bytes() + b"\0")
    with pytest.raises(FormatError, match="trailing bytes"):
        read_container(sample, MAGIC, {3})


def test_manifest_checksum_mismatch(sample: Path) -> None:
    data = sample.read_bytes()
    _, table, _ = split(data)
    table["manifest"]["hello"] = "there"
    sample.write_bytes(with_manifest(data, table, fix_hash=False))
    with pytest.raises(FormatError, match="manifest is corrupt"):
        read_container(sample, MAGIC, {3})


def _edit(entry: str, value: object):  # type: ignore[no-untyped-def]
    def f(t: dict) -> None:  # type: ignore[type-arg]
        t["blobs"][1][entry] = value

    return f


def _set_top(key: str, value: object):  # type: ignore[no-untyped-def]
    def f(t: dict) -> None:  # type: ignore[type-arg]
        t[key] = value

    return f


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set_top("alignment", 100), "'alignment'"),
        (_set_top("alignment", 4), "'alignment'"),
        (_set_top("alignment", True), "'alignment'"),
        (_set_top("manifest", []), "'manifest' is not an object"),
        (_set_top("blobs", {}), "'blobs' is not a list"),
        (_set_top("blobs", [{}] * 257), "257 entries"),
        (_set_top("extra", 1), "exactly keys"),
        (lambda t: t.pop("blobs"), "exactly keys"),
        (_edit("dtype", "|O"), "'dtype'"),
        (_edit("dtype", ">f4"), "'dtype'"),
        (_edit("dtype", "<f2"), "'nbytes'"),  # f32 blob relabelled f16: size no longer matches
        (_edit("shape", [-7]), "'shape'"),
        (_edit("shape", [7.0]), "'shape'"),
        (_edit("shape", [True] * 7), "'shape'"),
        (_edit("shape", [1 << 32]), "'shape'"),
        (_edit("shape", [1] * 9), "'shape'"),
        (_edit("shape", [1 << 31, 1 << 31, 1 << 31]), "'nbytes'"),
        (_edit("nbytes", 27), "'nbytes'"),
        (_edit("nbytes", "28"), "'nbytes'"),
        (_edit("offset", 4097), "'offset'"),
        (_edit("offset", 0), "'offset'"),
        (_edit("offset", -4096), "'offset'"),
        (_edit("offset", 1 << 62), "truncated"),
        (_edit("offset", 4096), "overlaps"),
        (_edit("sha256", "A" * 64), "'sha256'"),
        (_edit("sha256", 5), "'sha256'"),
        (_edit("name", "f16"), "appears twice"),
        (_edit("name", ""), "'name'"),
        (_edit("name", None), "'name'"),
        (lambda t: t["blobs"][1].pop("sha256"), "must have keys"),
        (lambda t: t["blobs"][1].update(more=1), "must have keys"),
    ],
)
def test_blob_table_validation(sample: Path, edit, match: str) -> None:  # type: ignore[no-untyped-def]
    data = sample.read_bytes()
    _, table, _ = split(data)
    edit(table)
    sample.write_bytes(with_manifest(data, table))
    with pytest.raises(FormatError, match=match) as e:
        read_container(sample, MAGIC, {3}).close()
    assert str(sample) in str(e.value)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b'{"alignment":4096,"blobs":[],"manifest":{"x":NaN}}', "JSON"),
        (b'{"alignment":4096,"alignment":4096,"blobs":[],"manifest":{}}', "duplicate key"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"[1,2]", "exactly keys"),
    ],
)
def test_manifest_json_validation(sample: Path, raw: bytes, match: str) -> None:
    sample.write_bytes(with_manifest(sample.read_bytes(), raw))
    with pytest.raises(FormatError, match=match):
        read_container(sample, MAGIC, {3}).close()


def test_nonzero_padding_refused(sample: Path) -> None:
    data = bytearray(sample.read_bytes())
    _, _, start = split(bytes(data))
    data[start - 1] = 1
    sample.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="padding"):
        read_container(sample, MAGIC, {3})


def test_huge_manifest_length_refused_before_reading(sample: Path) -> None:
    data = set_header_field(sample.read_bytes(), "manifest_length", (1 << 63).to_bytes(8, "little"))
    sample.write_bytes(data)
    with pytest.raises(FormatError, match="manifest length"):
        read_container(sample, MAGIC, {3})
