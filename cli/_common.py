"""Shared CLI plumbing: options and their validators, output checks, safe printing, exit codes.

Library code raises typed errors (runtime/errors.py); only this module turns them into one line
on stderr and an exit code (docs/architecture.md lists the codes). Usage errors (unknown option,
bad value, missing argument) are typer's own: its usage message and exit 2. Everything printed
through rich that may hold user data (file names, messages quoting them) goes through ``error``,
``warn`` or ``text``, which never read it as markup.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from spade_edge.runtime.errors import InputError, SpadeError
from spade_edge.runtime.fileio import write_atomic

#: exit code of an interrupted command (128 + SIGINT, what shells report for Ctrl-C)
EXIT_INTERRUPTED = 130
#: exit code of an unexpected OS-level failure (disk full while writing, ...)
EXIT_OS_ERROR = 1

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


# ------------------------------------------------------------------------------ printing


def text(value: object, style: str = "") -> Text:
    """User data as a rich renderable that is never parsed as markup (``[/x]`` stays literal)."""
    return Text(str(value), style=style)


def error(message: str) -> None:
    """``error: message`` on stderr, the message printed literally."""
    err_console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


def warn(message: str) -> None:
    """``warning: message`` on stderr, the message printed literally."""
    err_console.print(Text.assemble(("warning: ", "yellow"), message), soft_wrap=True)


def json_text(obj: Any, indent: int | None = None) -> str:
    """Strict JSON (RFC 8259: no NaN/Infinity); a non-finite number is a bug, reported as one."""
    try:
        return json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError as e:
        raise SpadeError(f"refusing to write a non-finite number as JSON ({e})") from None


# ------------------------------------------------------------------------------ validators


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

KOpt = Annotated[
    int | None, typer.Option("--k", min=1, help="Sets both --k-image and --k-gallery.")
]
KImageOpt = Annotated[
    int | None,
    typer.Option("--k-image", min=1, help="Nearest normal images averaged for the score."),
]
KGalleryOpt = Annotated[
    int | None,
    typer.Option(
        "--k-gallery", min=1, help="Nearest normal images whose positions form the pixel gallery."
    ),
]
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend",
        help="Runner: auto (engine file -> trt, else ort), ort, ort-gpu, trt, openvino, "
        "openvino-bf16, openvino-int8 (extra [openvino]).",
    ),
]
MatcherOpt = Annotated[
    str,
    typer.Option(
        "--matcher",
        help="kNN backend: numpy (CPU, the oracle), exact-int8 / exact-bf16 (CPU matrix units, "
        "exact re-rank), auto (fastest exact one this CPU has), cuda.",
    ),
]


def batch_size_opt(default_help: str) -> Any:
    """``--batch-size N`` (N >= 1)."""
    return typer.Option("--batch-size", min=1, help=default_help)


def far_opt(help_text: str, allow_zero: bool = True) -> Any:
    """``--far RATE``: a finite false-alarm rate in [0, 1) (0 = no thresholds), or (0, 1)."""
    return typer.Option(
        "--far", callback=check_far if allow_zero else check_far_positive, help=help_text
    )


def threshold_opt(flag: str, help_text: str) -> Any:
    """A score threshold option (``check_threshold``)."""
    return typer.Option(flag, callback=check_threshold, help=help_text)


def resolve_k(
    k: int | None, k_image: int | None, k_gallery: int | None
) -> tuple[int | None, int | None]:
    """``--k`` sets both; ``--k-image`` / ``--k-gallery`` override each (None = gallery default)."""
    return (k_image if k_image is not None else k), (k_gallery if k_gallery is not None else k)


# ------------------------------------------------------------------------------ outputs


def check_output_file(path: Path | None, option: str, make_parents: bool = False) -> None:
    """Fail before any work if ``path`` cannot be written (missing folder, read-only, a dir).

    Probes with a temp file in the destination folder, which is what the atomic write will do,
    so it holds for root and read-only file systems alike. ``make_parents``: the command creates
    missing folders, so the nearest existing one is probed instead.
    """
    if path is None:
        return
    if path.is_dir():
        raise InputError(f"{option} {path}: is a folder, not a file")
    folder = path.parent if str(path.parent) else Path(".")
    if make_parents:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    if not folder.is_dir():
        why = "is not a folder" if folder.exists() else "does not exist"
        raise InputError(f"{option} {path}: cannot write there, {folder} {why}")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as e:
        raise InputError(f"{option} {path}: cannot write to {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_dir(path: Path | None, option: str) -> None:
    """Create the output folder ``path`` now (not after the work) and check it is writable."""
    if path is None:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{option} {path}: cannot create folder ({e.strerror or e})") from None
    check_output_file(path / "probe", option)


def atomic_write_text(path: str | Path, content: str) -> None:
    """Write a report atomically so a crash never leaves half of it (names stay lossless)."""
    write_atomic(path, content.encode("utf-8", "surrogateescape"))


# ------------------------------------------------------------------------------ entry points


def handle_errors(fn: F) -> F:
    """Wrap a command: typed errors -> one line + their exit code; Ctrl-C -> a line + 130.

    Applied to the command function itself, so ``spade NAME``, ``spade-NAME`` and typer's test
    runner all behave the same; typer still sees the original signature.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpadeError as e:
            error(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print(Text("interrupted (Ctrl-C); nothing half-written was left", "red"))
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except OSError as e:  # e.g. disk full while writing a report: one line, not a traceback
            where = f"{os.fsdecode(e.filename)}: " if e.filename else ""
            error(f"{where}{e.strerror or e}")
            raise typer.Exit(EXIT_OS_ERROR) from None

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature


def _lossless_streams() -> None:
    """File names that are not UTF-8 print as their original bytes instead of crashing."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="surrogateescape")


def make_main(app: typer.Typer) -> Callable[[], Any]:
    """The console-script entry point of ``app`` (typer's standalone mode: usage errors -> 2)."""

    def main() -> Any:
        _lossless_streams()
        return app()

    return main
