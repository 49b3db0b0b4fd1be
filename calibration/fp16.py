"""fp16 models: weights and activations in half precision, fp32 inputs and outputs kept.

Why: TensorRT 10/11 build strongly typed networks, so an fp16 engine needs an fp16 ONNX graph;
on Jetson this halves the backbone's memory traffic. fp32 I/O are kept (``keep_io_types``) so
every runner feeds and reads the same float32 tensors whatever the precision.
ONNX Runtime CPU runs the result too (its parity with fp32 is checked here), but on x86 it is
*slower* than fp32: most CPU kernels have no fp16 path, so ORT inserts Cast nodes around them
(measured: docs/precision.md).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.calibration.derive import derive_model, parity, read_normal_images
from spade_edge.calibration.lineage import CHECK_QUERIES, CHECK_REFERENCE, accuracy_check, not_run
from spade_edge.runtime.errors import ExportError, InputError
from spade_edge.runtime.model_meta import ModelInfo

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
    step = _Fp16Step(fp16_block_list(op_block_list), check_dir, seed)
    return derive_model(src, dst, step).path


@dataclass
class _Fp16Step:
    """The fp16 step of ``derive_model``: convert, guard parity, check on normal images."""

    blocked: list[str]
    check_dir: str | Path | None
    seed: int
    started: float = field(default_factory=time.perf_counter)
    random_batch_rel: dict[str, float] = field(default_factory=dict)  # set by check
    precision = "fp16"
    verb = "convert"

    def build(self, parent: ModelInfo) -> tuple[Any, dict[str, Any]]:
        import onnx
        from onnxconverter_common.float16 import convert_float_to_float16

        try:
            with warnings.catch_warnings():  # one warning per tiny weight clamped to 1e-7: noise
                warnings.simplefilter("ignore", UserWarning)
                model = convert_float_to_float16(
                    onnx.load(str(parent.path)),
                    keep_io_types=True,
                    op_block_list=self.blocked,
                    disable_shape_infer=False,
                )
        except Exception as e:  # the converter raises bare ValueError/KeyError on odd graphs
            raise ExportError(f"{parent.path}: fp16 conversion failed: {e}") from None
        return model, {"fp16": {"fp32_ops": self.blocked, "io": "float32"}}

    def check(self, parent: ModelInfo, candidate: Path, dst: Path) -> dict[str, Any]:
        s = parent.contract.image_size
        x = np.random.default_rng(self.seed).standard_normal(
            (PARITY_BATCH, 3, s, s), dtype=np.float32
        )
        try:
            self.random_batch_rel = rel = parity(parent.path, candidate, x)
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
        if self.check_dir is None:
            return not_run("no normal images given for the accuracy check (check_dir)")
        imgs = read_normal_images(
            self.check_dir, parent.contract, CHECK_REFERENCE + CHECK_QUERIES, self.seed, "check"
        )
        n_q = min(CHECK_QUERIES, len(imgs.paths) // 2)
        check = accuracy_check(
            parent.path, candidate, imgs.tensors[:n_q], imgs.tensors[n_q:], "fp16"
        )
        check["skipped_images"] = len(imgs.skipped)
        return check

    def tool(self) -> dict[str, Any]:
        return {
            "tool": "spade_edge.calibration.fp16",
            "parity_random_batch": self.random_batch_rel,
            "check_dir_given": self.check_dir is not None,
            "seconds": round(time.perf_counter() - self.started, 3),
        }


__all__ = ["EXTRA_FP32_OPS", "FP16_GUARD_RTOL", "convert_fp16", "fp16_block_list"]
