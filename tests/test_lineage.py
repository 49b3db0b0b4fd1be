"""Lineage: which derived models may reuse their fp32 parent's gallery, and the check behind it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from spade_edge.calibration.fp16 import convert_fp16
from spade_edge.calibration.lineage import (
    METADATA_LINEAGE_KEY,
    Lineage,
    accuracy_check,
    read_lineage,
    set_lineage,
    spade_scores,
)
from spade_edge.runtime.compat import check_gallery, judge, same_features
from spade_edge.runtime.errors import CompatibilityError, FormatError
from spade_edge.runtime.gallery import Gallery, write_gallery
from spade_edge.runtime.model_meta import read_model_info
from spade_edge.runtime.preprocess import prepare_path
from spade_edge.runtime.runners.ort import OrtRunner

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxconverter_common")


def _write_images(folder: Path, n: int, seed: int = 0, size: int = 40) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([100 + 100 * xx, 180 - 90 * yy, 120 + 60 * np.sin(7 * xx * yy)], axis=2)
    for i in range(n):
        img = np.clip(base + rng.normal(0, 5, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture()
def family(tiny_onnx: Path, tmp_path: Path) -> dict[str, Path]:
    """An fp32 model, its fp16 child with a passed check, and a gallery packed with the parent."""
    normal = _write_images(tmp_path / "normal", 24)
    child = convert_fp16(tiny_onnx, tmp_path / "tiny.fp16.onnx", check_dir=normal)
    info = read_model_info(tiny_onnx)
    r = OrtRunner(tiny_onnx)
    try:
        paths = sorted(normal.glob("*.png"))[:6]
        f = r.infer(np.stack([prepare_path(p, info.contract).tensor for p in paths]))
    finally:
        r.close()
    gal = tmp_path / "gallery.bin"
    sources = [
        {"name": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in paths
    ]
    write_gallery(gal, info.contract, info.fingerprint, f.pooled, f.levels, sources)
    return {"parent": tiny_onnx, "child": child, "gallery": gal, "normal": normal}


def gallery_accepts(gallery_fp: str, info, metadata=None) -> bool:
    """The rule on a fingerprint alone (no gallery contract) for a model's info/metadata."""
    model = info if metadata is None else replace(info, metadata=metadata)
    return judge(gallery_fp, None, model).accepted


def check_gallery_for_model(gallery: Gallery, model: Path) -> bool:
    return check_gallery(gallery, read_model_info(model), str(model))


def _edit_lineage(src: Path, dst: Path, **changes) -> Path:
    m = onnx.load(str(src))
    props = {p.key: p.value for p in m.metadata_props}
    lin = Lineage.from_json(props[METADATA_LINEAGE_KEY])
    set_lineage(m, replace(lin, **changes))
    onnx.save(m, str(dst))
    return dst


def test_parent_gallery_accepted_by_passed_child(family):
    g = Gallery.open(family["gallery"])
    try:
        child = read_model_info(family["child"])
        assert read_lineage(child.metadata).passed  # the fixture's premise
        assert gallery_accepts(g.fingerprint, child)
        assert check_gallery_for_model(g, family["child"]) is True
        assert check_gallery_for_model(g, family["parent"]) is False  # same model, not derived
    finally:
        g.close()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"passed": False, "gallery_compatible": False}, "did not pass"),
        ({"gallery_compatible": False}, "gallery-compatible"),
        ({"parent_fingerprint": "0" * 64}, "another parent"),
        ({"fingerprint": "1" * 64}, "another graph"),
        ({"precision": "int8"}, "lineage is for int8"),
    ],
)
def test_child_refused_unless_lineage_says_so(family, tmp_path: Path, changes, reason):
    bad = _edit_lineage(family["child"], tmp_path / "bad.onnx", **changes)
    info = read_model_info(bad)
    g = Gallery.open(family["gallery"])
    try:
        v = judge(g.fingerprint, g.contract, info)
        assert not v.accepted and reason in v.reason
        assert not gallery_accepts(g.fingerprint, info)
        with pytest.raises(CompatibilityError) as e:
            check_gallery_for_model(g, bad)
        msg = str(e.value)
        assert "spade-pack" in msg and str(bad) in msg and str(g.path) in msg
    finally:
        g.close()


def test_missing_or_corrupt_lineage_refused(family, tmp_path: Path):
    m = onnx.load(str(family["child"]))
    props = {p.key: p.value for p in m.metadata_props}
    info = read_model_info(family["child"])
    parent_fp = info.contract.parent_fingerprint
    no_lineage = {k: v for k, v in props.items() if k != METADATA_LINEAGE_KEY}
    assert not gallery_accepts(parent_fp, info, no_lineage)
    assert "no lineage" in judge(parent_fp, None, replace(info, metadata=no_lineage)).reason
    for junk in ("{not json", "[]", json.dumps({"version": 99}), json.dumps({"version": 1})):
        meta = {**props, METADATA_LINEAGE_KEY: junk}
        assert not gallery_accepts(parent_fp, info, meta)


def test_other_models_refused(family, tmp_path: Path):
    from tiny_model import make_tiny_model

    other = make_tiny_model(tmp_path / "other.onnx", image_size=32, seed=7)
    g = Gallery.open(family["gallery"])
    try:
        oi = read_model_info(other)
        assert not gallery_accepts(g.fingerprint, oi)
        with pytest.raises(CompatibilityError, match="spade-pack"):
            check_gallery_for_model(g, other)
        # a different image size: features not comparable, refused before any lineage logic
        big = make_tiny_model(tmp_path / "big.onnx", image_size=48)
        with pytest.raises(CompatibilityError, match="do not match"):
            check_gallery_for_model(g, big)
        # the child of ANOTHER parent is refused even with a passed lineage
        child_other = convert_fp16(other, tmp_path / "other.fp16.onnx", check_dir=family["normal"])
        ci = read_model_info(child_other)
        assert read_lineage(ci.metadata).passed
        assert not gallery_accepts(g.fingerprint, ci)
    finally:
        g.close()


def test_same_model_accepted_without_lineage(family):
    info = read_model_info(family["parent"])
    assert read_lineage(info.metadata) is None
    assert gallery_accepts(info.fingerprint, info)
    other = replace(info, fingerprint="2" * 64, metadata={})
    assert not gallery_accepts(info.fingerprint, other)


def test_same_features_ignores_only_precision_fields(tiny_onnx: Path):
    c = read_model_info(tiny_onnx).contract
    assert same_features(c, c.with_precision("int8", "a" * 64))
    assert same_features(c, replace(c, extra={"quantization": {"method": "minmax"}}))
    assert not same_features(c, replace(c, mean=(0.5, 0.5, 0.5)))
    assert not same_features(c, replace(c, image_size=16, resize=18))


def test_lineage_json_validation():
    good = Lineage("a" * 64, "b" * 64, "fp16", {"passed": True}, {}, True, True, {"t": 1})
    assert Lineage.from_json(good.to_json()) == good
    bad = json.loads(good.to_json())
    bad["parent_fingerprint"] = "xyz"
    with pytest.raises(FormatError, match="parent_fingerprint"):
        Lineage.from_json(json.dumps(bad), "m.onnx")
    bad = json.loads(good.to_json())
    bad["passed"] = "yes"
    with pytest.raises(FormatError, match="passed"):
        Lineage.from_json(json.dumps(bad), "m.onnx")
    with pytest.raises(FormatError, match=r"m\.onnx"):
        Lineage.from_json("nope", "m.onnx")


def test_accuracy_check_self_is_exact_and_needs_images(tiny_onnx: Path, tmp_path: Path):
    c = read_model_info(tiny_onnx).contract
    paths = sorted(_write_images(tmp_path / "n", 12).glob("*.png"))
    x = np.stack([prepare_path(p, c).tensor for p in paths])
    same = accuracy_check(tiny_onnx, tiny_onnx, x[:4], x[4:], "fp16")
    assert same["passed"] and same["image_score_rel"] == 0.0 and same["map_rel"] == 0.0
    assert same["min_cosine"] == pytest.approx(1.0)
    few = accuracy_check(tiny_onnx, tiny_onnx, x[:2], x[4:], "fp16")
    assert few["run"] is False and not few["passed"]


def test_accuracy_check_detects_a_different_model(tiny_onnx: Path, tmp_path: Path):
    """A model with other weights (same contract) must fail the check, not slip through."""
    from tiny_model import make_tiny_model

    other = make_tiny_model(tmp_path / "other.onnx", image_size=32, seed=3)
    c = read_model_info(tiny_onnx).contract
    paths = sorted(_write_images(tmp_path / "n", 12).glob("*.png"))
    x = np.stack([prepare_path(p, c).tensor for p in paths])
    res = accuracy_check(tiny_onnx, other, x[:4], x[4:], "int8")
    assert res["run"] and not res["passed"] and res["failed"]


def test_spade_scores_match_brute_force(tiny_onnx: Path):
    """The check's scoring equals a direct computation of the SPADE distances."""
    from spade_edge.runtime.scoring import combine_levels

    c = read_model_info(tiny_onnx).contract
    rng = np.random.default_rng(0)
    n_g, k = 7, 3
    g_levels = [
        rng.standard_normal((n_g, lv.height, lv.width, lv.channels)).astype(np.float32)
        for lv in c.levels
    ]
    g_pooled = rng.standard_normal((n_g, c.pooled_dim)).astype(np.float32)
    q_levels = [rng.standard_normal((2, *g.shape[1:])).astype(np.float32) for g in g_levels]
    q_pooled = rng.standard_normal((2, c.pooled_dim)).astype(np.float32)
    scores, maps = spade_scores(c, g_levels, g_pooled, q_levels, q_pooled, k_image=k, k_gallery=k)
    g16 = g_pooled.astype(np.float16).astype(np.float64)
    for i in range(2):
        d = np.linalg.norm(g16 - q_pooled[i], axis=1)
        nn = np.argsort(d)[:k]
        assert scores[i] == pytest.approx(np.sort(d)[:k].mean(), rel=1e-5)
        lvl_maps = []
        for lv, gl, ql in zip(c.levels, g_levels, q_levels, strict=True):
            gpos = gl[nn].astype(np.float16).astype(np.float64).reshape(-1, lv.channels)
            qpos = ql[i].reshape(-1, lv.channels).astype(np.float64)
            dd = np.sqrt(((qpos[:, None, :] - gpos[None, :, :]) ** 2).sum(-1)).min(1)
            lvl_maps.append(dd.reshape(lv.height, lv.width).astype(np.float32))
        ref = combine_levels(lvl_maps, c.image_size, 4.0)
        np.testing.assert_allclose(maps[i], ref, rtol=1e-4, atol=1e-4)
