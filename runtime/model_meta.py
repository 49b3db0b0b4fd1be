"""Read the spade-edge identity (contract + fingerprint) of an ONNX model without torch or onnx."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spade_edge.runtime.contract import (
    METADATA_CONTRACT_KEY,
    METADATA_FINGERPRINT_KEY,
    Contract,
)
from spade_edge.runtime.errors import FormatError, InputError
from spade_edge.runtime.fileio import is_sha256_hex


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    contract: Contract
    fingerprint: str
    metadata: dict[str, str]


def contract_from_metadata(meta: dict[str, str], source: str) -> tuple[Contract, str]:
    """Contract and fingerprint from ONNX ``metadata_props``; refuses non-spade models."""
    if METADATA_CONTRACT_KEY not in meta or METADATA_FINGERPRINT_KEY not in meta:
        raise FormatError(
            f"{source}: not a spade-edge model (no '{METADATA_CONTRACT_KEY}' metadata); "
            "export it with spade-export"
        )
    fp = meta[METADATA_FINGERPRINT_KEY]
    if not is_sha256_hex(fp):
        raise FormatError(f"{source}: malformed model fingerprint {fp!r}")
    return Contract.from_json(meta[METADATA_CONTRACT_KEY], source), fp


def graph_fingerprint(model_proto: Any) -> str:
    """The model fingerprint: SHA-256 hex of the deterministic serialisation of an ONNX
    ``ModelProto``'s graph (weights included; metadata lives outside ``graph``, so adding the
    contract or a lineage record does not change it). Duck-typed: no onnx import here."""
    return hashlib.sha256(model_proto.graph.SerializeToString(deterministic=True)).hexdigest()


def read_model_info(path: str | Path) -> ModelInfo:
    """Open an ONNX file's metadata through onnxruntime (part of the lean install)."""
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: model file not found")
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise FormatError(f"{p}: not a loadable ONNX model: {str(e).splitlines()[0]}") from None
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    contract, fp = contract_from_metadata(meta, str(p))
    return ModelInfo(p, contract, fp, meta)
