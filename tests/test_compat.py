"""runtime/compat.py: the one rule for "does this gallery fit this model" (no ONNX needed)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from tiny_model import tiny_contract

from spade_edge.runtime.compat import (
    METADATA_LINEAGE_KEY,
    Lineage,
    check_gallery,
    feature_differences,
    judge,
    same_features,
)
from spade_edge.runtime.contract import Contract
from spade_edge.runtime.errors import CompatibilityError
from spade_edge.runtime.gallery import Gallery, write_gallery

FP_A = hashlib.sha256(b"model a").hexdigest()
FP_B = hashlib.sha256(b"model b").hexdigest()


def _model(contract: Contract, fp: str, meta: dict[str, str] | None = None) -> Any:
    return SimpleNamespace(contract=contract, fingerprint=fp, metadata=meta or {})


def _child(parent: Contract, fp: str = FP_B, **lineage: Any) -> Any:
    """An fp16 model derived from FP_A whose lineage says what ``lineage`` overrides."""
    lin = Lineage(
        parent_fingerprint=FP_A,
        fingerprint=fp,
        precision="fp16",
        check={"passed": True},
        tolerances={},
        passed=True,
        gallery_compatible=True,
    )
    lin = replace(lin, **lineage)
    return _model(parent.with_precision("fp16", FP_A), fp, {METADATA_LINEAGE_KEY: lin.to_json()})


@pytest.fixture
def gallery(tmp_path: Path) -> Gallery:
    c = tiny_contract(32)
    rng = np.random.default_rng(0)
    p = tmp_path / "g.bin"
    write_gallery(
        p,
        c,
        FP_A,
        rng.normal(size=(3, c.pooled_dim)).astype(np.float32),
        [rng.normal(size=(3, lv.height, lv.width, lv.channels)) for lv in c.levels],
        [{"name": f"{i}.png", "sha256": hashlib.sha256(bytes([i])).hexdigest()} for i in range(3)],
    )
    with Gallery.open(p) as g:
        yield g


def test_packing_model_accepted(gallery: Gallery) -> None:
    assert check_gallery(gallery, _model(gallery.contract, FP_A), "a.onnx") is False
    # the weights tag is model identity (the fingerprint decides), extra is free-form
    other_tag = replace(gallery.contract, weights="file:x.pth", extra={"note": 1})
    assert check_gallery(gallery, _model(other_tag, FP_A), "a.onnx") is False


def test_other_model_refused_naming_everything(gallery: Gallery) -> None:
    with pytest.raises(CompatibilityError) as e:
        check_gallery(gallery, _model(gallery.contract, FP_B), "b.onnx")
    msg = str(e.value)
    assert FP_A in msg and FP_B in msg and str(gallery.path) in msg and "b.onnx" in msg
    assert "spade-pack b.onnx" in msg


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"mean": (0.5, 0.5, 0.5)}, "mean"),
        ({"resize": 40}, "resize"),
        ({"color": "BGR"}, "color"),
        ({"antialias": False}, "antialias"),
        ({"pooled_dim": 7}, "pooled_dim"),
    ],
)
def test_other_preprocessing_refused_even_with_same_fingerprint(
    gallery: Gallery, change: dict[str, Any], field: str
) -> None:
    """Both old definitions of "same preprocessing" are covered by one (any feature field)."""
    c = replace(gallery.contract, **change)
    assert feature_differences(gallery.contract, c) == [field]
    assert not same_features(gallery.contract, c)
    with pytest.raises(
        CompatibilityError, match=f"disagree on the preprocessing contract .*{field}"
    ):
        check_gallery(gallery, _model(c, FP_A), "m.onnx")


def test_derived_model_needs_its_lineage(gallery: Gallery) -> None:
    assert check_gallery(gallery, _child(gallery.contract), "b16.onnx") is True
    no_lineage = _child(gallery.contract)
    no_lineage.metadata = {}
    cases = [
        (no_lineage, "no lineage record"),
        (_child(gallery.contract, passed=False), "did not pass"),
        (_child(gallery.contract, gallery_compatible=False), "gallery-compatible"),
        (_child(gallery.contract, parent_fingerprint=FP_B), "another parent"),
        (_child(gallery.contract, fingerprint="1" * 64), "another graph"),
        (_child(gallery.contract, precision="int8"), "lineage is for int8"),
    ]
    for model, reason in cases:
        v = judge(gallery.fingerprint, gallery.contract, model)
        assert not v.accepted and reason in v.reason, (reason, v)
        with pytest.raises(CompatibilityError, match=reason):
            check_gallery(gallery, model, "b16.onnx")
    junk = _child(gallery.contract)
    junk.metadata = {METADATA_LINEAGE_KEY: "{not json"}
    assert "unreadable" in judge(gallery.fingerprint, gallery.contract, junk).reason


def test_derived_model_of_another_parent_refused(gallery: Gallery) -> None:
    m = _child(gallery.contract)
    m.contract = gallery.contract.with_precision("fp16", FP_B)
    with pytest.raises(CompatibilityError, match="not from the gallery's model"):
        check_gallery(gallery, m, "c.onnx")


def test_appending_needs_the_exact_model(gallery: Gallery) -> None:
    """Features of a derived model must never be mixed into the parent's gallery."""
    with pytest.raises(CompatibilityError, match="exact packing model"):
        check_gallery(gallery, _child(gallery.contract), "b16.onnx", allow_derived=False)
    assert check_gallery(gallery, _model(gallery.contract, FP_A), "a", allow_derived=False) is False
