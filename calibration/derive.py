"""Deriving an fp16 or INT8 model from its fp32 parent: one pipeline, the precision step plugged in.

Every derived model is made the same way (``derive_model``): refuse anything but an fp32
spade-edge parent; let the precision step build the new graph (fp16.py converts, int8.py
calibrates on normal images); stamp the derived contract and graph fingerprint; save a candidate
copy beside the destination and let the step check it (fp16's parity guard, the accuracy check on
held-out normal images); record the result as lineage and write the model atomically. A failed
check raises and writes nothing. The normal images both steps read come from
``read_normal_images``.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from spade_edge.calibration.lineage import (
    make_lineage,
    relative_error,
    save_model_atomic,
    set_lineage,
    stamp_derived,
)
from spade_edge.runtime.compat import Lineage
from spade_edge.runtime.contract import Contract
from spade_edge.runtime.errors import CalibrationError, ImageDecodeError, InputError
from spade_edge.runtime.model_meta import ModelInfo, read_model_info
from spade_edge.runtime.preprocess import list_images, prepare_path
from spade_edge.runtime.runners.ort import OrtRunner

log = logging.getLogger(__name__)


class UnreadableImageWarning(UserWarning):
    """A calibration / check image could not be decoded and was skipped."""


@dataclass
class ImageSet:
    """Decoded, preprocessed normal images and what was skipped on the way."""

    tensors: np.ndarray  # float32 [N, 3, S, S]
    paths: list[Path]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    available: int = 0  # image files found in the folder


def read_normal_images(
    folder: str | Path, contract: Any, want: int, seed: int = 0, what: str = "calibration"
) -> ImageSet:
    """Decode up to ``want`` images of ``folder`` in a seeded random order through the contract.

    Random (not first-N) so consecutive, similar captures do not dominate; seeded so the same
    folder always gives the same model. Unreadable files are skipped with an
    ``UnreadableImageWarning`` and counted; the caller decides whether enough remain.
    """
    folder = Path(folder)
    try:
        paths = list_images([folder])
    except InputError as e:
        raise CalibrationError(f"{what} images: {e}") from None
    order = np.random.default_rng(seed).permutation(len(paths))
    tensors: list[np.ndarray] = []
    used: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for i in order:
        if len(tensors) >= want:
            break
        p = paths[int(i)]
        try:
            tensors.append(prepare_path(p, contract).tensor)
        except (ImageDecodeError, InputError) as e:
            skipped.append((str(p), str(e)))
            warnings.warn(f"{what}: skipped unreadable image {e}", UnreadableImageWarning, 2)
            log.warning("%s: skipped unreadable image %s", what, e)
            continue
        used.append(p)
    s = contract.image_size
    arr = np.stack(tensors) if tensors else np.zeros((0, 3, s, s), np.float32)
    return ImageSet(arr, used, skipped, len(paths))


def parity(parent: str | Path, derived: str | Path, x: np.ndarray) -> dict[str, float]:
    """Per-output relative error max|derived - parent| / max|parent| on batch ``x`` (ORT CPU)."""
    a, b = OrtRunner(parent), OrtRunner(derived)
    try:
        fa, fb = a.infer(x), b.infer(x)
        names = a.contract.output_names
    finally:
        a.close()
        b.close()
    pairs = zip(names, [*fa.levels, fa.pooled], [*fb.levels, fb.pooled], strict=True)
    return {name: relative_error(d, p) for name, p, d in pairs}


class PrecisionStep(Protocol):
    """What differs between deriving an fp16 and an INT8 model (the rest is ``derive_model``)."""

    #: the derived contract's precision ("fp16", "int8")
    precision: str
    #: what the user does to the fp32 parent ("convert", "quantize"), for the refusal message
    verb: str

    def build(self, parent: ModelInfo) -> tuple[Any, dict[str, Any]]:
        """(the derived ONNX ModelProto, entries merged into its contract's ``extra``)."""
        ...

    def check(self, parent: ModelInfo, candidate: Path, dst: Path) -> dict[str, Any]:
        """Check ``candidate`` (the stamped model, saved beside ``dst``) against ``parent``:
        raise to write nothing, else return the accuracy check record for the lineage."""
        ...

    def tool(self) -> dict[str, Any]:
        """The lineage's ``tool`` record (asked for once the checks have run)."""
        ...


@dataclass(frozen=True)
class DerivedModel:
    """What ``derive_model`` wrote."""

    path: Path
    parent: ModelInfo
    contract: Contract
    lineage: Lineage


def fp32_parent(src: Path, verb: str) -> ModelInfo:
    """The fp32 spade-edge model at ``src``; a derived model is not a valid parent."""
    info = read_model_info(src)  # FormatError for a model without the spade contract
    if info.contract.precision != "fp32":
        raise InputError(
            f"{src}: is already a {info.contract.precision} model; {verb} the fp32 parent"
        )
    return info


def derive_model(src: str | Path, dst: str | Path, step: PrecisionStep) -> DerivedModel:
    """Derive ``step.precision``'s model from the fp32 model ``src`` and write it to ``dst``
    (atomic, with its lineage record); nothing is written when the step or a check fails."""
    src, dst = Path(src), Path(dst)
    parent = fp32_parent(src, step.verb)
    model, extra = step.build(parent)
    contract, fingerprint = stamp_derived(model, parent, step.precision, extra)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".spade-{step.precision}-", dir=dst.parent) as tmp:
        candidate = save_model_atomic(model, Path(tmp) / f"{step.precision}.onnx")
        check = step.check(parent, candidate, dst)
    lineage = make_lineage(
        parent, fingerprint, step.precision, check, step.tool(), derived_contract=contract
    )
    set_lineage(model, lineage)
    save_model_atomic(model, dst)
    return DerivedModel(dst, parent, contract, lineage)


__all__ = [
    "DerivedModel",
    "ImageSet",
    "PrecisionStep",
    "UnreadableImageWarning",
    "derive_model",
    "fp32_parent",
    "parity",
    "read_normal_images",
]
