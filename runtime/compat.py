"""Does this gallery fit this model? The one place that decides (lineage reading included).

A gallery holds features computed by one exact model (its fingerprint), under one preprocessing
contract. A model may score against it iff

1. both contracts describe the same features: everything but ``precision``,
   ``parent_fingerprint``, the free-form ``extra`` and the ``weights`` tag (the fingerprint
   covers the weights) is equal: preprocessing, levels, shapes, names -- otherwise the
   features are not comparable, whatever the fingerprints say; and
2. either the model is the packing model (equal fingerprints), or it is an fp16/INT8 model
   derived from it whose lineage record (ONNX metadata ``spade_edge.lineage``, written by the
   precision tooling, carried into engine files) names that parent, is bound to this very graph,
   and says its accuracy check passed and it is gallery-compatible (docs/precision.md).

Appending to a gallery (``spade-pack --add-to``) needs the exact model: ``allow_derived=False``.
Everything here is plain data (no onnx, no torch): the Detector, the packer, spade-inspect and
the precision tooling all call it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from spade_edge.runtime.contract import Contract, parse_json
from spade_edge.runtime.errors import CompatibilityError, FormatError
from spade_edge.runtime.fileio import is_sha256_hex

METADATA_LINEAGE_KEY = "spade_edge.lineage"
LINEAGE_VERSION = 1
DERIVED_PRECISIONS = ("fp16", "int8")
#: Contract fields that may differ between a model and the gallery it reads (``weights`` is
#: model identity, which the fingerprint decides, not a property of the feature layout).
DERIVED_FIELDS = frozenset({"precision", "parent_fingerprint", "extra", "weights"})


class ModelIdentity(Protocol):
    """What compatibility needs to know about a model: a Runner, a ``ModelInfo``, an
    ``EngineFile`` all qualify (``metadata``: the ONNX metadata_props, lineage included)."""

    contract: Contract
    fingerprint: str

    @property
    def metadata(self) -> Mapping[str, str]: ...


class GalleryIdentity(Protocol):
    """What compatibility needs to know about a gallery (``Gallery``, ``InMemoryGallery``...)."""

    contract: Contract
    fingerprint: str
    path: Any


# ------------------------------------------------------------------------------ lineage


@dataclass
class Lineage:
    """The ``spade_edge.lineage`` metadata record of a derived model."""

    parent_fingerprint: str
    fingerprint: str
    precision: str
    check: dict[str, Any]
    tolerances: dict[str, float]
    passed: bool
    gallery_compatible: bool
    tool: dict[str, Any] = field(default_factory=dict)
    version: int = LINEAGE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> Lineage:
        """Parse and type-check; every problem is a FormatError naming ``source``."""
        d = parse_json(text, source, "lineage record")
        if not isinstance(d, dict):
            raise FormatError(f"{source}: lineage record is not a JSON object")
        if d.get("version") != LINEAGE_VERSION:
            raise FormatError(
                f"{source}: lineage version {d.get('version')!r} is not supported "
                f"(this spade-edge reads version {LINEAGE_VERSION})"
            )
        want = {
            "parent_fingerprint": str,
            "fingerprint": str,
            "precision": str,
            "check": dict,
            "tolerances": dict,
            "passed": bool,
            "gallery_compatible": bool,
            "tool": dict,
        }
        for key, typ in want.items():
            if not isinstance(d.get(key), typ):
                raise FormatError(f"{source}: lineage field {key!r} missing or not {typ.__name__}")
        for key in ("parent_fingerprint", "fingerprint"):
            if not is_sha256_hex(d[key]):
                raise FormatError(f"{source}: lineage field {key!r} is not a SHA-256 hex digest")
        return cls(**{k: d[k] for k in (*want, "version")})


def read_lineage(metadata: Mapping[str, str], source: str = "model") -> Lineage | None:
    """The lineage record of a model's metadata, None when it has none."""
    text = metadata.get(METADATA_LINEAGE_KEY)
    return None if text is None else Lineage.from_json(text, source)


# ------------------------------------------------------------------------------ the rule


def feature_differences(a: Contract, b: Contract) -> list[str]:
    """Contract fields (other than :data:`DERIVED_FIELDS`) on which two contracts differ."""
    return [
        f.name
        for f in fields(Contract)
        if f.name not in DERIVED_FIELDS and getattr(a, f.name) != getattr(b, f.name)
    ]


def same_features(a: Contract, b: Contract) -> bool:
    """True when two contracts describe the same preprocessing and output tensors."""
    return not feature_differences(a, b)


@dataclass(frozen=True)
class Verdict:
    """Outcome of :func:`judge`: may the model use the gallery, is it a derived model, why."""

    accepted: bool
    derived: bool
    reason: str


def _lineage_verdict(
    gallery_fingerprint: str, fingerprint: str, contract: Contract, metadata: Mapping[str, str]
) -> Verdict:
    """Rule 2 for a model that is not the packing model."""

    def no(reason: str) -> Verdict:
        return Verdict(False, False, reason)

    if contract.precision not in DERIVED_PRECISIONS:
        return no(f"it is a different {contract.precision} model")
    if contract.parent_fingerprint != gallery_fingerprint:
        return no(
            f"it is derived from {str(contract.parent_fingerprint)[:16]}…, "
            "not from the gallery's model"
        )
    try:
        lin = read_lineage(metadata)
    except FormatError as e:
        return no(f"its lineage record is unreadable ({e})")
    if lin is None:
        return no("it carries no lineage record (spade_edge.lineage)")
    if lin.parent_fingerprint != gallery_fingerprint:
        return no("its lineage names another parent model")
    if lin.precision != contract.precision:
        return no(f"its lineage is for {lin.precision}, the contract says {contract.precision}")
    if lin.fingerprint != fingerprint:
        return no("its lineage record belongs to another graph (model edited after conversion)")
    if not lin.passed:
        failed = ", ".join(lin.check.get("failed", [])) or lin.check.get("reason", "not run")
        return no(f"its accuracy check on held-out normal images did not pass ({failed})")
    if not lin.gallery_compatible:
        return no("its lineage does not declare it gallery-compatible")
    return Verdict(True, True, "derived model whose accuracy check passed")


def judge(
    gallery_fingerprint: str,
    gallery_contract: Contract | None,
    model: ModelIdentity,
    allow_derived: bool = True,
) -> Verdict:
    """Apply the rule (module docstring). ``gallery_contract`` None skips rule 1 (callers that
    only know a fingerprint, e.g. lineage tests)."""
    if gallery_contract is not None:
        diff = feature_differences(gallery_contract, model.contract)
        if diff:
            return Verdict(False, False, f"their contracts disagree on {', '.join(diff)}")
    if model.fingerprint == gallery_fingerprint:
        return Verdict(True, False, "same model")
    metadata = getattr(model, "metadata", None) or {}  # runners without ONNX metadata: none
    v = _lineage_verdict(gallery_fingerprint, model.fingerprint, model.contract, metadata)
    if v.accepted and not allow_derived:
        return Verdict(False, True, "appending needs the exact packing model, not a derived one")
    return v


def check_gallery(
    gallery: GalleryIdentity, model: ModelIdentity, source: str | Path, allow_derived: bool = True
) -> bool:
    """Raise CompatibilityError (naming both files, both fingerprints, the reason and the fix)
    unless ``model`` may use ``gallery``. Returns True for a derived model reusing its parent's
    gallery, False for the packing model itself."""
    v = judge(gallery.fingerprint, gallery.contract, model, allow_derived)
    if v.accepted:
        return v.derived
    repack = f"repack with `spade-pack {source} NORMAL_IMAGES... -o NEW.bin`"
    diff = feature_differences(gallery.contract, model.contract)
    if diff:
        raise CompatibilityError(
            f"gallery {gallery.path} and model {source} disagree on the preprocessing contract "
            f"({', '.join(diff)}): its features ({gallery.contract.backbone}, "
            f"{gallery.contract.image_size}px) do not match the model's "
            f"({model.contract.backbone}, {model.contract.image_size}px); {repack}"
        )
    raise CompatibilityError(
        f"gallery {gallery.path} was packed with model {gallery.fingerprint}, but {source} is "
        f"model {model.fingerprint} ({model.contract.precision}), which may not use it: "
        f"{v.reason}; {repack}"
    )


__all__ = [
    "DERIVED_PRECISIONS",
    "LINEAGE_VERSION",
    "METADATA_LINEAGE_KEY",
    "GalleryIdentity",
    "Lineage",
    "ModelIdentity",
    "Verdict",
    "check_gallery",
    "feature_differences",
    "judge",
    "read_lineage",
    "same_features",
]
