"""fp16 models: weights and activations in half precision, fp32 inputs and outputs kept.

Why: TensorRT 10/11 build strongly typed networks, so an fp16 engine needs an fp16 ONNX graph;
on Jetson this halves the backbone's memory traffic. fp32 I/O are kept (``keep_io_types``) so
every runner feeds and reads the same float32 tensors whatever the precision.
ONNX Runtime CPU runs the result too (its parity with fp32 is checked here), but on x86 it is
*slower* than fp32: most CPU kernels have no fp16 path, so ORT inserts Cast nodes around them
(measured: docs/precision.md).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.calibration.int8 import read_normal_images
from spade_edge.calibration.lineage import (
    CHECK_QUERIES,
    CHECK_REFERENCE,
    DEFAULT_TOLERANCES,
    accuracy_check,
    make_lineage,
    save_model_atomic,
    set_lineage,
    stamp_derived,
)
from spade_edge.runtime.errors import ExportError, InputError
from spade_edge.runtime.model_meta import read_model_info
from spade_edge.runtime.runners.ort import OrtRunner

#: Largest relative error (max|fp16 - fp32| / max|fp32| per output, seeded random batch)
#: accepted at conversion: a guard against broken conversions (overflow, a mis-typed node),
#: not an accuracy claim. Measured: tiny model ~1e-3, Lite0 4.4e-3 on the random batch and up to
#: 1.3e-2 on bottle images -- all of it from rounding the weights to fp16 (docs/precision.md).
FP16_GUARD_RTOL = 2e-2
PARITY_BATCH = 2
#: Ops kept in fp32 on top of onnxconverter-common's default block list (which already holds
#: Resize, Upsample, TopK, Range, CumSum, Min, Max, ...). ReduceMean: the pooled feature is a
#: mean over up to 56x56 positions, summed in fp16 it loses ~3 bits; keeping it fp32 costs one
#: Cast of the last feature map.
EXTRA_FP32_OPS: tuple[str, ...] = ("ReduceMean", "GlobalAveragePool")


def fp16_block_list(extra: Iterable[str] = ()) -> list[str]:
    """onnxconverter-common's default block list + ours + ``extra``."""
    from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST

    return sorted({*DEFAULT_OP_BLOCK_LIST, *EXTRA_FP32_OPS, *extra})


def parity(parent: str | Path, derived: str | Path, x: np.ndarray) -> dict[str, float]:
    """Per-output relative error max|derived - parent| / max|parent| on batch ``x`` (ORT CPU)."""
    a, b = OrtRunner(parent), OrtRunner(derived)
    try:
        fa, fb = a.infer(x), b.infer(x)
        names = a.contract.output_names
    finally:
        a.close()
        b.close()
    out = {}
    for name, p, d in zip(names, [*fa.levels, fa.pooled], [*fb.levels, fb.pooled], strict=True):
        scale = float(np.abs(p).max())
        out[name] = float(np.abs(d - p).max() / scale) if scale > 0 else float(np.abs(d).max())
    return out


def convert_fp16(
    src: str | Path,
    dst: str | Path,
    *,
    check_dir: str | Path | None = None,
    op_block_list: Iterable[str] = (),
    seed: int = 0,
) -> Path:
    """Convert the fp32 spade-edge model ``src`` to fp16 at ``dst`` (atomic); returns ``dst``.

    Always checks parity with the parent on a seeded random batch (ExportError above
    FP16_GUARD_RTOL, nothing written). With ``check_dir`` (normal images), also runs the accuracy
    check on held-out normal images that decides whether the fp16 model may reuse galleries
    packed with the parent (lineage, docs/precision.md); without it, it may not.
    """
    import onnx
    from onnxconverter_common.float16 import convert_float_to_float16

    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    info = read_model_info(src)  # FormatError for a model without the spade contract
    if info.contract.precision != "fp32":
        raise InputError(
            f"{src}: is already a {info.contract.precision} model; convert the fp32 parent"
        )
    blocked = fp16_block_list(op_block_list)
    try:
        with warnings.catch_warnings():  # one warning per tiny weight clamped to 1e-7: noise
            warnings.simplefilter("ignore", UserWarning)
            model = convert_float_to_float16(
                onnx.load(str(src)),
                keep_io_types=True,
                op_block_list=blocked,
                disable_shape_infer=False,
            )
    except Exception as e:  # the converter raises bare ValueError/KeyError on odd graphs
        raise ExportError(f"{src}: fp16 conversion failed: {e}") from None
    s = info.contract.image_size
    x = np.random.default_rng(seed).standard_normal((PARITY_BATCH, 3, s, s), dtype=np.float32)
    contract, fingerprint = stamp_derived(
        model, info, "fp16", {"fp16": {"fp32_ops": blocked, "io": "float32"}}
    )
    folder = dst.parent if str(dst.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".spade-fp16-", dir=folder) as tmp:
        tmp_model = Path(tmp) / "fp16.onnx"
        save_model_atomic(model, tmp_model)
        try:
            rel = parity(src, tmp_model, x)
        except Exception as e:
            if isinstance(e, InputError):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{dst}: ONNX Runtime cannot run the fp16 model: {msg}") from None
        worst = max(rel, key=lambda k: rel[k])
        if not rel[worst] <= FP16_GUARD_RTOL:
            raise ExportError(
                f"{dst}: fp16 parity check failed: output {worst} differs from fp32 by "
                f"{rel[worst]:.2e} relative (limit {FP16_GUARD_RTOL:.0e}); nothing written"
            )
        check = _check(src, tmp_model, check_dir, info.contract, seed)
    tool = {
        "tool": "spade_edge.calibration.fp16",
        "parity_random_batch": rel,
        "check_dir_given": check_dir is not None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    lineage = make_lineage(info, fingerprint, "fp16", check, tool, derived_contract=contract)
    set_lineage(model, lineage)
    return save_model_atomic(model, dst)


def _check(
    src: Path, derived: Path, check_dir: str | Path | None, contract: Any, seed: int
) -> dict[str, Any]:
    if check_dir is None:
        return {
            "run": False,
            "passed": False,
            "reason": "no normal images given for the accuracy check (check_dir)",
            "failed": ["not run"],
        }
    imgs = read_normal_images(check_dir, contract, CHECK_REFERENCE + CHECK_QUERIES, seed, "check")
    n_q = min(CHECK_QUERIES, len(imgs.paths) // 2)
    queries, reference = imgs.tensors[:n_q], imgs.tensors[n_q:]
    check = accuracy_check(src, derived, queries, reference, "fp16", DEFAULT_TOLERANCES["fp16"])
    check["skipped_images"] = len(imgs.skipped)
    return check


__all__ = ["EXTRA_FP32_OPS", "FP16_GUARD_RTOL", "convert_fp16", "fp16_block_list", "parity"]
