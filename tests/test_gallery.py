"""Gallery format v1: round trip, golden file, header validation, model checks, rewrite/append."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fuzz_gallery import exercise_copy, exercise_engine, run_fuzz, seeds_for, split, with_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from make_golden import GOLDEN, golden_inputs
from tiny_model import tiny_contract

from spade_edge.runtime.contract import Contract
from spade_edge.runtime.errors import FormatError, InputError
from spade_edge.runtime.gallery import (
    Gallery,
    append_gallery,
    bytes_per_image,
    duplicate_indices,
    rewrite_gallery,
    sqnorms_fp16,
    write_gallery,
)
from spade_edge.runtime.matchers.base import GalleryArrays

FP_A = hashlib.sha256(b"model a").hexdigest()
FP_B = hashlib.sha256(b"model b").hexdigest()


def _features(contract: Contract, n: int, seed: int = 0, scale: float = 3.0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "pooled": (rng.normal(size=(n, contract.pooled_dim)) * scale).astype(np.float32),
        "levels": [
            (rng.normal(size=(n, lv.height, lv.width, lv.channels)) * scale).astype(np.float32)
            for lv in contract.levels
        ],
        "sources": [
            {
                "name": f"img{seed}_{i}.png",
                "sha256": hashlib.sha256(f"{seed}/{i}".encode()).hexdigest(),
            }
            for i in range(n)
        ],
    }


@pytest.fixture
def contract() -> Contract:
    return tiny_contract(32)


@pytest.fixture
def gal(tmp_path: Path, contract: Contract) -> tuple[Path, dict[str, Any]]:
    f = _features(contract, 6)
    p = tmp_path / "g.bin"
    write_gallery(p, contract, FP_A, **f)
    return p, f


def test_round_trip_equals_fp16_rounding(
    gal: tuple[Path, dict[str, Any]], contract: Contract
) -> None:
    p, f = gal
    with Gallery.open(p, verify=True) as g:
        assert isinstance(g.contract, Contract) and g.contract == contract
        assert g.n_images == 6 and g.fingerprint == FP_A and g.path == p
        assert g.pooled.dtype == np.float16 and g.pooled.shape == (6, contract.pooled_dim)
        np.testing.assert_array_equal(g.pooled, f["pooled"].astype(np.float16))
        for got, want, lv in zip(g.levels, f["levels"], contract.levels, strict=True):
            assert got.dtype == np.float16
            assert got.shape == (6, lv.height, lv.width, lv.channels)
            np.testing.assert_array_equal(got, want.astype(np.float16))
        assert g.sources == f["sources"]
        assert g.default_k == 5 and g.thresholds is None
        assert g.manifest["tool_version"] and g.manifest["contract"] == contract.to_dict()
        assert not g.pooled.flags.writeable


def test_norms_are_of_the_fp16_values(gal: tuple[Path, dict[str, Any]]) -> None:
    p, f = gal
    with Gallery.open(p) as g:
        assert g.pooled_sqnorms.dtype == np.float32 and g.pooled_sqnorms.shape == (6,)
        ref = (f["pooled"].astype(np.float16).astype(np.float64) ** 2).sum(-1)
        np.testing.assert_allclose(g.pooled_sqnorms, ref, rtol=1e-6)  # float32 accumulation
        # and NOT the norms of the fp32 originals (they differ by the rounding)
        assert not np.array_equal(g.pooled_sqnorms, (f["pooled"] ** 2).sum(-1))
        for sq, lv, want in zip(g.level_sqnorms, g.levels, f["levels"], strict=True):
            assert sq.dtype == np.float32 and sq.shape == lv.shape[:-1]
            ref = (want.astype(np.float16).astype(np.float64) ** 2).sum(-1)
            np.testing.assert_allclose(sq, ref, rtol=1e-6)


def test_gallery_satisfies_matcher_protocol(gal: tuple[Path, dict[str, Any]]) -> None:
    with Gallery.open(gal[0]) as g:
        for name in GalleryArrays.__annotations__:
            assert hasattr(g, name), name


def test_blobs_are_aligned(gal: tuple[Path, dict[str, Any]]) -> None:
    with Gallery.open(gal[0]) as g:
        assert all(b.offset % 4096 == 0 for b in g.blob_info.values())


def test_bytes_per_image_wrn50_layout() -> None:
    from spade_edge.runtime.contract import Level

    c = Contract(
        backbone="wrn50",
        weights="imagenet",
        levels=(
            Level("layer1", 4, 256, 56, 56),
            Level("layer2", 8, 512, 28, 28),
            Level("layer3", 16, 1024, 14, 14),
        ),
        pooled_dim=2048,
    )
    # fp16 features + fp32 norms + 32-byte content hash, by hand:
    by_hand = (56 * 56 * 256 + 28 * 28 * 512 + 14 * 14 * 1024 + 2048) * 2
    by_hand += (56 * 56 + 28 * 28 + 14 * 14 + 1) * 4 + 32
    assert bytes_per_image(c) == by_hand == 2_830_452


def test_sqnorms_fp16_chunking_is_invisible(monkeypatch: pytest.MonkeyPatch) -> None:
    import spade_edge.runtime.gallery as gal_mod

    a = np.random.default_rng(3).normal(size=(130, 3, 300)).astype(np.float16)
    monkeypatch.setattr(gal_mod, "_NORM_CHUNK_ELEMENTS", 3000)  # 10 rows per chunk
    chunked = sqnorms_fp16(a)
    monkeypatch.setattr(gal_mod, "_NORM_CHUNK_ELEMENTS", 1 << 20)
    np.testing.assert_array_equal(chunked, sqnorms_fp16(a))
    ref = (a.astype(np.float64) ** 2).sum(-1)
    np.testing.assert_allclose(chunked, ref, rtol=1e-6)


# ----------------------------------------------------------------------------------- golden


def test_golden_file_reads_exact_values() -> None:
    inp = golden_inputs()
    with Gallery.open(GOLDEN, verify=True) as g:
        assert g.fingerprint == inp["fingerprint"]
        assert g.created == "2024-01-01T00:00:00Z"
        assert g.thresholds == {"image": 0.5} and g.extra == {"note": "golden"}
        assert g.pooled.tolist() == [[-0.375, -0.25, -0.125, 0.0], [0.125, 0.25, 0.375, 0.5]]
        assert g.pooled_sqnorms.tolist() == [0.21875, 0.46875]
        assert g.levels[0][1, 1, 1].tolist() == [2.75, 3.0, 3.25]  # (21..23 - 10) / 4
        assert g.level_sqnorms[0][0, 0, 0] == 6.25 + 5.0625 + 4.0
        assert [s["name"] for s in g.sources] == ["good/000.png", "good/001.png"]
        assert g.contract == inp["contract"]
        assert g.blob_info["level0"].offset == 3 * 4096


def test_golden_file_is_reproduced_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "golden.bin"
    write_gallery(out, **golden_inputs())
    assert out.read_bytes() == GOLDEN.read_bytes()


# ------------------------------------------------------------------------- header validation


def _edit_manifest(p: Path, fn) -> None:  # type: ignore[no-untyped-def]
    data = p.read_bytes()
    _, table, _ = split(data)
    fn(table["manifest"])
    p.write_bytes(with_manifest(data, table))


def _set(key: str, value: Any):  # type: ignore[no-untyped-def]
    def f(m: dict[str, Any]) -> None:
        m[key] = value

    return f


def _level(key: str, value: Any):  # type: ignore[no-untyped-def]
    def f(m: dict[str, Any]) -> None:
        m["levels"][1][key] = value

    return f


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (_set("kind", "spade-edge engine"), "'kind'"),
        (_set("format_version", 2), "'format_version'"),
        (_set("format_version", True), "'format_version'"),
        (_set("tool_version", 1), "'tool_version'"),
        (_set("model_fingerprint", "ABC"), "'model_fingerprint'"),
        (_set("model_fingerprint", "0" * 63), "'model_fingerprint'"),
        (_set("n_images", 0), "'n_images'"),
        (_set("n_images", -1), "'n_images'"),
        (_set("n_images", 10_000_001), "'n_images'"),
        (_set("n_images", "6"), "'n_images'"),
        (_set("n_images", 6.0), "'n_images'"),
        (_set("n_images", 5), "shape"),  # consistent field, but blobs are [6, ...]
        (_set("pooled_dim", 25), "'pooled_dim'"),
        (_set("levels", []), "'levels'"),
        (_set("levels", None), "'levels'"),
        (_level("height", 5), r"'levels\[1\].height'"),
        (_level("channels", True), r"'levels\[1\].channels'"),
        (_level("blob", "level0"), r"'levels\[1\].blob'"),
        (_level("extra", 1), r"'levels\[1\]'"),
        (_set("dtypes", {"features": "<f4", "sqnorms": "<f4"}), "'dtypes'"),
        (_set("sources", {"names_blob": "x", "sha256_blob": "y"}), "'sources'"),
        (_set("created", 5), "'created'"),
        (_set("default_k", 0), "'default_k'"),
        (_set("default_k", "5"), "'default_k'"),
        (_set("thresholds", [1]), "'thresholds'"),
        (_set("extra", "x"), "'extra'"),
        (_set("contract", {"version": 99}), "'contract'"),
        (lambda m: m["contract"].pop("levels"), "'contract'"),
        (lambda m: m["contract"]["levels"][0].update(height=9), r"levels\[0\]"),
        (lambda m: m.pop("created"), "missing \\['created'\\]"),
        (_set("surprise", 1), "unknown \\['surprise'\\]"),
    ],
)
def test_manifest_field_validation(gal: tuple[Path, dict[str, Any]], edit, field: str) -> None:  # type: ignore[no-untyped-def]
    p, _ = gal
    _edit_manifest(p, edit)
    with pytest.raises(FormatError, match=field) as e:
        Gallery.open(p).close()
    assert str(p) in str(e.value)


def _blob_edit(fn):  # type: ignore[no-untyped-def]
    def f(t: dict[str, Any]) -> None:
        fn({b["name"]: b for b in t["blobs"]})

    return f


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            _blob_edit(lambda b: b["pooled"].update(dtype="<f4", nbytes=b["pooled"]["nbytes"] * 2)),
            "dtype",
        ),
        (_blob_edit(lambda b: b["pooled"].update(shape=[24, 6])), "shape"),
        (_blob_edit(lambda b: b["level2_sqnorms"].update(shape=[6, 4])), "shape"),
        (
            _blob_edit(lambda b: b["source_names"].update(name="names")),
            "missing \\['source_names'\\]",
        ),
    ],
)
def test_blob_layout_validation(gal: tuple[Path, dict[str, Any]], edit, match: str) -> None:  # type: ignore[no-untyped-def]
    p, _ = gal
    data = p.read_bytes()
    _, table, _ = split(data)
    edit(table)
    p.write_bytes(with_manifest(data, table))
    with pytest.raises(FormatError, match=match):
        Gallery.open(p).close()


def test_source_names_blob_validated_on_use(tmp_path: Path, contract: Contract) -> None:
    f = _features(contract, 2)
    p = tmp_path / "g.bin"
    write_gallery(p, contract, FP_A, **f)
    data = bytearray(p.read_bytes())
    with Gallery.open(p) as g:
        off = g.blob_info["source_names"].offset
    i = data.index(b"\n", off)
    data[i] = ord("_")  # two names become one
    p.write_bytes(bytes(data))
    with Gallery.open(p) as g, pytest.raises(FormatError, match="1 names"):
        _ = g.sources
    with pytest.raises(FormatError, match="source_names' is corrupt"):
        Gallery.open(p, verify=True)


def test_wrong_magic_names_the_kind(tmp_path: Path) -> None:
    p = tmp_path / "model.onnx"
    p.write_bytes(b"\x08\x08\x12\x04abcd" + b"\0" * 64)
    with pytest.raises(FormatError, match=r"not a spade-edge gallery .*ONNX model"):
        Gallery.open(p)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(0, 24600))
def test_truncated_golden_is_format_error(tmp_path: Path, cut: int) -> None:
    data = GOLDEN.read_bytes()
    p = tmp_path / "cut.bin"
    p.write_bytes(data[: min(cut, len(data) - 1)])
    with pytest.raises(FormatError):
        Gallery.open(p)


# --------------------------------------------------------------------------- writer checks


def test_writer_refuses_bad_features(tmp_path: Path, contract: Contract) -> None:
    p = tmp_path / "bad.bin"
    f = _features(contract, 3)
    with pytest.raises(InputError, match="pooled features have shape"):
        write_gallery(p, contract, FP_A, f["pooled"][:, :5], f["levels"], f["sources"])
    with pytest.raises(InputError, match="'layer2' features have shape"):
        lv = [f["levels"][0], f["levels"][1][:, :, :, :3], f["levels"][2]]
        write_gallery(p, contract, FP_A, f["pooled"], lv, f["sources"])
    with pytest.raises(InputError, match="2 feature levels"):
        write_gallery(p, contract, FP_A, f["pooled"], f["levels"][:2], f["sources"])
    big = f["pooled"].copy()
    big[1, 2] = 70000.0  # beyond fp16: would score NaN/inf
    with pytest.raises(InputError, match="fp16 range"):
        write_gallery(p, contract, FP_A, big, f["levels"], f["sources"])
    nan = [a.copy() for a in f["levels"]]
    nan[0][0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        write_gallery(p, contract, FP_A, f["pooled"], nan, f["sources"])
    with pytest.raises(InputError, match=r"1\.\.10000000"):
        write_gallery(p, contract, FP_A, f["pooled"][:0], [a[:0] for a in f["levels"]], [])
    with pytest.raises(InputError, match="2 sources given for 3"):
        write_gallery(p, contract, FP_A, f["pooled"], f["levels"], f["sources"][:2])
    dup = copy.deepcopy(f["sources"])
    dup[2]["sha256"] = dup[0]["sha256"]
    with pytest.raises(InputError, match=r"same content as .img0_0\.png."):
        write_gallery(p, contract, FP_A, f["pooled"], f["levels"], dup)
    with pytest.raises(InputError, match="fingerprint"):
        write_gallery(p, contract, "xyz", f["pooled"], f["levels"], f["sources"])
    with pytest.raises(InputError, match="default_k"):
        write_gallery(p, contract, FP_A, f["pooled"], f["levels"], f["sources"], default_k=0)
    assert not p.exists()


# --------------------------------------------------------------------------- rewrite/append


def test_rewrite_changes_only_the_manifest(
    gal: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    p, _ = gal
    out = tmp_path / "calibrated.bin"
    with Gallery.open(p) as g:
        rewrite_gallery(g, out, thresholds={"image": 1.5, "far": 0.01}, default_k=7)
        created = g.created
    with Gallery.open(out, verify=True) as h, Gallery.open(p) as g:
        assert h.thresholds == {"image": 1.5, "far": 0.01} and h.default_k == 7
        assert h.created == created and h.extra == g.extra and h.sources == g.sources
        np.testing.assert_array_equal(h.pooled, g.pooled)
        for a, b in zip(h.levels + h.level_sqnorms, g.levels + g.level_sqnorms, strict=True):
            np.testing.assert_array_equal(a, b)


def test_rewrite_in_place(gal: tuple[Path, dict[str, Any]]) -> None:
    p, f = gal
    with Gallery.open(p) as g:
        rewrite_gallery(g, p, extra={"line": 3})
        np.testing.assert_array_equal(g.pooled, f["pooled"].astype(np.float16))  # old map intact
    with Gallery.open(p, verify=True) as h:
        assert h.extra == {"line": 3} and h.thresholds is None and h.default_k == 5


def test_append_writes_the_union(
    gal: tuple[Path, dict[str, Any]], contract: Contract, tmp_path: Path
) -> None:
    p, f = gal
    new = _features(contract, 3, seed=1)
    out = tmp_path / "more.bin"
    with Gallery.open(p) as g:
        assert append_gallery(g, out, **new) == 9
    with Gallery.open(out, verify=True) as h:
        assert h.n_images == 9
        np.testing.assert_array_equal(
            h.pooled, np.concatenate([f["pooled"], new["pooled"]]).astype(np.float16)
        )
        np.testing.assert_array_equal(
            h.level_sqnorms[1][6:], sqnorms_fp16(new["levels"][1].astype(np.float16))
        )
        assert h.sources == f["sources"] + new["sources"]


def test_append_refuses_duplicates(
    gal: tuple[Path, dict[str, Any]], contract: Contract, tmp_path: Path
) -> None:
    p, f = gal
    new = _features(contract, 2, seed=1)
    new["sources"][1]["sha256"] = f["sources"][4]["sha256"]
    with Gallery.open(p) as g:
        assert duplicate_indices(g.sources, new["sources"]) == [(1, "img0_4.png")]
        with pytest.raises(InputError, match="same content"):
            append_gallery(g, tmp_path / "x.bin", **new)
    assert not (tmp_path / "x.bin").exists()


def test_duplicate_indices_within_new() -> None:
    a = {"name": "a", "sha256": "1" * 64}
    b = {"name": "b", "sha256": "2" * 64}
    assert duplicate_indices([], [a, b, {"name": "c", "sha256": "1" * 64}]) == [(2, "a")]


# -------------------------------------------------------------------------------- fuzzing


def test_fuzz_smoke() -> None:
    r = run_fuzz(300, seed=1)
    assert r["crashes"] == []
    assert r["rejected"] > 200  # the mutations really do break files


@pytest.mark.parametrize(
    ("target", "exercise", "n"), [("engine", exercise_engine, 300), ("copy", exercise_copy, 150)]
)
def test_fuzz_smoke_engine_and_copy_paths(tmp_path: Path, target: str, exercise, n: int) -> None:  # type: ignore[no-untyped-def]
    """Engine reader, and --add-to / recalibration / rewrite over mutated galleries: no crash,
    and no mutated input ever comes out as a file that verifies (bounded for default CI)."""
    r = run_fuzz(n, seed=2, seeds=seeds_for(target, tmp_path), exercise=exercise)
    assert r["crashes"] == []
    assert r["rejected"] > 0.8 * n


@pytest.mark.fuzz
@pytest.mark.parametrize(
    ("target", "exercise"), [("engine", exercise_engine), ("copy", exercise_copy)]
)
def test_fuzz_10000_engine_and_copy_paths(tmp_path: Path, target: str, exercise) -> None:  # type: ignore[no-untyped-def]
    r = run_fuzz(10_000, seed=0, seeds=seeds_for(target, tmp_path), exercise=exercise)
    print(f"\n{target}: {r['files']} files, {len(r['crashes'])} crashes ({r['rejected']} rejected)")
    assert r["crashes"] == []


@pytest.mark.fuzz
def test_fuzz_10000(tmp_path: Path) -> None:
    c = tiny_contract(32)
    p = tmp_path / "seed.bin"
    write_gallery(p, c, FP_A, **_features(c, 3), thresholds={"image": 1.0}, created="now")
    r = run_fuzz(10_000, seed=0, seeds=[GOLDEN.read_bytes(), p.read_bytes()])
    print(f"\n{r['files']} files, {len(r['crashes'])} crashes ({r['rejected']} rejected)")
    assert r["crashes"] == []
