"""Options and arguments more than one command takes, declared once with their validation.

A flag shared by several commands (``--k``, ``--backend``, ``--far``, ...) is defined here so its
name, help and checks cannot drift between commands; an option only one command has stays in
that command's signature. Values that typer's own types cannot check (finite floats in a range)
get a callback here; a failed check is typer's usage error (exit 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer


def _finite(
    lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
) -> Callable[[float | None], float | None]:
    """A typer callback: the float must be finite and within the given bounds."""

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        ok = math.isfinite(value)
        ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
        ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
        if not ok:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            if hi is not None:
                rng = f" in {left}{lo:g}, {hi:g}{right}"
            else:
                rng = f" {'>' if lo_open else '>='} {lo:g}" if lo is not None else ""
            raise typer.BadParameter(f"{value!r} is not a finite number{rng}")
        return value

    return check


#: a false-alarm rate where 0 means "no thresholds" (spade pack, spade eval)
check_far = _finite(0.0, 1.0, hi_open=True)
#: a false-alarm rate thresholds are computed at (spade threshold)
check_far_positive = _finite(0.0, 1.0, lo_open=True, hi_open=True)
#: a score threshold: finite and >= 0 (a NaN threshold would pass every part)
check_threshold = _finite(0.0)


#: the model a command scores with (spade eval, spade serve)
Model = Annotated[Path, typer.Argument(help="Exported ONNX model or TensorRT engine file.")]
#: a gallery a command reads (spade run, spade threshold, spade triton)
Gallery = Annotated[Path, typer.Argument(help="Gallery file from spade-pack.")]

#: K of the SPADE protocol (spade eval, run, threshold, triton; ``resolve_k`` combines them)
K = Annotated[int | None, typer.Option("--k", min=1, help="Sets both --k-image and --k-gallery.")]
KImage = Annotated[
    int | None,
    typer.Option("--k-image", min=1, help="Nearest normal images averaged for the score."),
]
KGallery = Annotated[
    int | None,
    typer.Option(
        "--k-gallery", min=1, help="Nearest normal images whose positions form the pixel gallery."
    ),
]
#: runner and matcher backends (runtime/registry.py's tables)
Backend = Annotated[
    str,
    typer.Option(
        "--backend",
        help="Runner: auto (engine file -> trt, else ort), ort, ort-gpu, trt, openvino, "
        "openvino-bf16, openvino-int8 (extra [openvino]).",
    ),
]
Matcher = Annotated[
    str,
    typer.Option(
        "--matcher",
        help="kNN backend: numpy (CPU, the oracle), exact-int8 / exact-bf16 (CPU matrix units, "
        "exact re-rank), auto (fastest exact one this CPU has), cuda.",
    ),
]


def batch_size(default_help: str) -> Any:
    """``--batch-size N`` (N >= 1)."""
    return typer.Option("--batch-size", min=1, help=default_help)


def far(help_text: str, allow_zero: bool = True) -> Any:
    """``--far RATE``: a finite false-alarm rate in [0, 1) (0 = no thresholds), or (0, 1)."""
    return typer.Option(
        "--far", callback=check_far if allow_zero else check_far_positive, help=help_text
    )


def threshold(flag: str, help_text: str) -> Any:
    """A score threshold option (``check_threshold``)."""
    return typer.Option(flag, callback=check_threshold, help=help_text)


def resolve_k(
    k: int | None, k_image: int | None, k_gallery: int | None
) -> tuple[int | None, int | None]:
    """``--k`` sets both; ``--k-image`` / ``--k-gallery`` override each (None = gallery default)."""
    return (k_image if k_image is not None else k), (k_gallery if k_gallery is not None else k)
