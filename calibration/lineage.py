"""Lineage of derived (fp16 / INT8) models: the accuracy check and the record that carries it.

Why: a gallery holds features computed by one exact model (its fingerprint). An fp16 or INT8
model derived from that fp32 model computes *almost* the same features, so re-packing the
gallery is usually unnecessary -- but only if someone measured that "almost". The derived
model therefore carries a lineage record in its ONNX metadata (``spade_edge.lineage``)::

    {"version": 1, "parent_fingerprint": <fp32 model>, "fingerprint": <this graph>,
     "precision": "fp16"|"int8", "check": {...accuracy check on held-out normal images...},
     "tolerances": {...}, "passed": bool, "gallery_compatible": bool, "tool": {...}}

This module measures and writes that record. Reading it and deciding whether a gallery may be
used is the runtime's job (runtime/compat.py, the one place for that rule). Neither onnx nor
torch is imported at module level; the accuracy check loads ONNX Runtime lazily.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.compat import (
    METADATA_LINEAGE_KEY,
    Lineage,
    read_lineage,
    same_features,
)
from spade_edge.runtime.contract import METADATA_CONTRACT_KEY, METADATA_FINGERPRINT_KEY, Contract
from spade_edge.runtime.errors import FormatError
from spade_edge.runtime.fileio import write_atomic
from spade_edge.runtime.gallery import InMemoryGallery
from spade_edge.runtime.matchers.numpy_matcher import NumpyMatcher
from spade_edge.runtime.model_meta import ModelInfo, graph_fingerprint
from spade_edge.runtime.runners.base import Features
from spade_edge.runtime.runners.ort import OrtRunner

#: Held-out normal images scored in the accuracy check (queries) and parent-model features
#: forming the check's mini gallery (reference). Fewer than the minimum -> check not run.
CHECK_QUERIES = 8
CHECK_REFERENCE = 16
MIN_CHECK_QUERIES = 4
MIN_CHECK_REFERENCE = 4
CHECK_K = 5


@dataclass(frozen=True)
class Tolerances:
    """Largest deviations (derived vs parent, on held-out normal images) that still pass.

    ``image_score_rel``: max over images of |s_derived - s_parent| / max(s_parent) (SPADE
    image score against a gallery of parent features; normalised by the largest normal score,
    the scale image thresholds are set at). ``map_rel``: max over images and pixels of
    |m_derived - m_parent| / max(m_parent), m = the final anomaly map (upsampled, averaged,
    blurred): a pixel moves by at most this fraction of the largest normal map value, which is
    the scale pixel thresholds are set at. ``min_cosine``: smallest cosine similarity between
    derived and parent output tensors of one image (any output). Measured values and the
    margin: docs/precision.md.
    """

    image_score_rel: float
    map_rel: float
    min_cosine: float


#: Reusing a gallery is about scores, not about how the model was made, so fp16 and INT8 face
#: the same limits: about 2x the worst fp16 deviation measured on MVTec bottle with Lite0
#: (image 0.0044, map 0.0087, cosine 0.99998). INT8 measures ~0.2-0.3 on both deviations,
#: i.e. it needs its own gallery (docs/precision.md, "Accuracy check").
GALLERY_REUSE_TOLERANCES = Tolerances(image_score_rel=0.01, map_rel=0.02, min_cosine=0.999)
DEFAULT_TOLERANCES: dict[str, Tolerances] = {
    "fp16": GALLERY_REUSE_TOLERANCES,
    "int8": GALLERY_REUSE_TOLERANCES,
}


# ----------------------------------------------------------------------- the accuracy check


def relative_error(derived: np.ndarray, parent: np.ndarray) -> float:
    """max|derived - parent| / max|parent| (the project's parity measure); the absolute error
    where the parent output is all zero, so a deviation from zero still shows."""
    scale = float(np.abs(parent).max())
    diff = float(np.abs(derived - parent).max())
    return diff / scale if scale > 0 else diff


def not_run(reason: str) -> dict[str, Any]:
    """The check record of an accuracy check that could not run (no gallery reuse)."""
    return {"run": False, "passed": False, "reason": reason, "failed": ["not run"]}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    den = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    return float(a64 @ b64 / den) if den > 0 else (1.0 if not a64.any() and not b64.any() else 0.0)


def _features(runner: Any, x: np.ndarray, batch: int = 8) -> tuple[list[np.ndarray], np.ndarray]:
    levels: list[list[np.ndarray]] = []
    pooled: list[np.ndarray] = []
    for s in range(0, len(x), batch):
        f = runner.infer(x[s : s + batch]).to_host()
        levels.append([np.asarray(lv, dtype=np.float32) for lv in f.levels])
        pooled.append(np.asarray(f.pooled, dtype=np.float32))
    return [np.concatenate(z) for z in zip(*levels, strict=True)], np.concatenate(pooled)


def spade_scores(
    contract: Contract,
    gallery_levels: list[np.ndarray],
    gallery_pooled: np.ndarray,
    levels: list[np.ndarray],
    pooled: np.ndarray,
    k_image: int = CHECK_K,
    k_gallery: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores [N] and anomaly maps [N, S, S] of query features against a mini gallery.

    Uses the runtime's NumPy matcher (the scoring oracle): kNN image score, per-level
    nearest-position distances among the ``k_gallery`` nearest gallery images (None: all of
    them), upsampling, level mean and blur.
    """
    g = InMemoryGallery.from_features(contract, gallery_levels, gallery_pooled)
    kg = g.n_images if k_gallery is None else min(k_gallery, g.n_images)
    m = NumpyMatcher(g, k_image=min(k_image, g.n_images), k_gallery=kg)
    res = m.score(Features(levels=levels, pooled=pooled, batch=len(pooled)))
    return (
        np.array([r.image_score for r in res], dtype=np.float64),
        np.stack([r.anomaly_map for r in res]).astype(np.float64),
    )


def accuracy_check(
    parent: str | Path,
    derived: str | Path,
    queries: np.ndarray,
    reference: np.ndarray,
    precision: str,
    tolerances: Tolerances | None = None,
) -> dict[str, Any]:
    """Compare a derived model with its parent on held-out normal images.

    ``queries`` [N,3,S,S] and ``reference`` [M,3,S,S] are preprocessed normal images (the
    queries must not have been used for calibration). The reference images, run through the
    PARENT, form a mini gallery stored like a packed one (fp16); queries are scored against it
    with the parent's and with the derived model's features -- the situation of a derived model
    reusing its parent's gallery. Image scores use k = 5 neighbours; anomaly maps search all
    reference images, so a near-tie between two normal images that flips the neighbour choice
    (a large jump in a 16-image mini gallery, negligible in a real one) is not mistaken for a
    precision error. Returns the measurements, the failed criteria and ``passed``.
    """
    tol = tolerances or DEFAULT_TOLERANCES[precision]
    if len(queries) < MIN_CHECK_QUERIES or len(reference) < MIN_CHECK_REFERENCE:
        return not_run(
            f"too few held-out normal images ({len(queries)} queries, {len(reference)} "
            f"reference; need {MIN_CHECK_QUERIES} and {MIN_CHECK_REFERENCE})"
        )
    pr = OrtRunner(parent)
    dr = OrtRunner(derived)
    try:
        contract = pr.contract
        g_levels, g_pooled = _features(pr, reference)
        p_levels, p_pooled = _features(pr, queries)
        d_levels, d_pooled = _features(dr, queries)
    finally:
        pr.close()
        dr.close()

    outputs: dict[str, dict[str, float]] = {}
    names = contract.output_names
    for name, p, dd in zip(names, [*p_levels, p_pooled], [*d_levels, d_pooled], strict=True):
        outputs[name] = {
            "max_rel": relative_error(dd, p),
            "min_cosine": min(_cosine(dd[i], p[i]) for i in range(len(p))),
        }
    ps, pmaps = spade_scores(contract, g_levels, g_pooled, p_levels, p_pooled)
    ds, dmaps = spade_scores(contract, g_levels, g_pooled, d_levels, d_pooled)
    image_rel = float(np.abs(ds - ps).max() / max(float(ps.max()), 1e-12))
    map_scale = float(pmaps.max())
    map_rel = float(np.abs(dmaps - pmaps).max() / max(map_scale, 1e-12))
    map_mean_rel = float(np.abs(dmaps - pmaps).mean() / max(float(pmaps.mean()), 1e-12))
    min_cos = min(o["min_cosine"] for o in outputs.values())
    failed = []
    if not image_rel <= tol.image_score_rel:
        failed.append(f"image score deviation {image_rel:.4f} > {tol.image_score_rel}")
    if not map_rel <= tol.map_rel:
        failed.append(f"anomaly map deviation {map_rel:.4f} > {tol.map_rel}")
    if not min_cos >= tol.min_cosine:
        failed.append(f"feature cosine {min_cos:.5f} < {tol.min_cosine}")
    return {
        "run": True,
        "queries": len(queries),
        "reference": len(reference),
        "k_image": min(CHECK_K, len(reference)),
        "k_gallery": len(reference),
        "image_score_rel": image_rel,
        "map_rel": map_rel,
        "map_mean_rel": map_mean_rel,
        "min_cosine": min_cos,
        "outputs": outputs,
        "failed": failed,
        "passed": not failed,
    }


# --------------------------------------------------------------- stamping and atomic writing


def stamp_derived(
    model: Any, parent: ModelInfo, precision: str, extra: Mapping[str, Any] | None = None
) -> tuple[Contract, str]:
    """Write the derived contract and the new graph fingerprint into ``model`` (in place).

    The contract is the parent's with ``precision`` and ``parent_fingerprint`` set; ``extra``
    is merged into ``contract.extra``. Other metadata of the parent is kept, except a stale
    lineage record. Returns (contract, fingerprint).
    """
    contract = parent.contract.with_precision(precision, parent.fingerprint)
    if extra:
        contract = replace(contract, extra={**contract.extra, **extra})
    fingerprint = graph_fingerprint(model)
    props = {k: v for k, v in parent.metadata.items() if k != METADATA_LINEAGE_KEY}
    props[METADATA_CONTRACT_KEY] = contract.to_json()
    props[METADATA_FINGERPRINT_KEY] = fingerprint
    set_metadata(model, props)
    return contract, fingerprint


def set_metadata(model: Any, props: Mapping[str, str]) -> None:
    """Replace ``model.metadata_props`` with ``props`` (sorted, so output bytes are stable)."""
    del model.metadata_props[:]
    for k in sorted(props):
        p = model.metadata_props.add()
        p.key, p.value = k, props[k]


def set_lineage(model: Any, lineage: Lineage) -> None:
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_LINEAGE_KEY] = lineage.to_json()
    set_metadata(model, props)


def save_model_atomic(model: Any, dst: str | Path) -> Path:
    """Serialise an ONNX ModelProto to ``dst`` atomically (see runtime/fileio.py)."""
    dst = Path(dst)
    data = model.SerializeToString()
    if len(data) >= 2**31 - 1:
        raise FormatError(f"{dst}: model is over 2 GB, which a single-file ONNX cannot hold")
    write_atomic(dst, data)
    return dst


def make_lineage(
    parent: ModelInfo,
    fingerprint: str,
    precision: str,
    check: dict[str, Any],
    tool: Mapping[str, Any],
    tolerances: Tolerances | None = None,
    derived_contract: Contract | None = None,
) -> Lineage:
    """Build the lineage record; gallery-compatible iff the check passed and features match."""
    tol = tolerances or DEFAULT_TOLERANCES[precision]
    passed = bool(check.get("passed"))
    compatible = passed and (
        derived_contract is None or same_features(parent.contract, derived_contract)
    )
    return Lineage(
        parent_fingerprint=parent.fingerprint,
        fingerprint=fingerprint,
        precision=precision,
        check=check,
        tolerances=asdict(tol),
        passed=passed,
        gallery_compatible=compatible,
        tool=dict(tool),
    )


__all__ = [
    "DEFAULT_TOLERANCES",
    "METADATA_LINEAGE_KEY",
    "Lineage",
    "Tolerances",
    "accuracy_check",
    "graph_fingerprint",
    "make_lineage",
    "not_run",
    "read_lineage",
    "relative_error",
    "save_model_atomic",
    "spade_scores",
    "stamp_derived",
]
