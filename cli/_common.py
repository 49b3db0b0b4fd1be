"""Shared CLI plumbing: command registration, output checks, safe printing, exit codes.

Library code raises typed errors (runtime/errors.py); only this module turns them into one line
on stderr and an exit code (docs/architecture.md lists the codes). Usage errors (unknown option,
bad value, missing argument) are typer's own: its usage message and exit 2; the options several
commands share are declared in ``options.py``. Everything printed through rich that may hold
user data (file names, messages quoting them) goes through ``error``, ``warn`` or ``text``,
which never read it as markup.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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


def new_app(help: str | None = None, *, no_args_is_help: bool = False) -> typer.Typer:
    """The typer app of one ``spade-NAME`` command (no shell-completion install, rich help)."""
    return typer.Typer(
        add_completion=False,
        no_args_is_help=no_args_is_help,
        rich_markup_mode="rich",
        help=help,
    )


def command(app: typer.Typer, name: str | None = None) -> Callable[[F], F]:
    """Register a function as ``app``'s command, wrapped in ``handle_errors``.

    Returns the wrapped function: the ``spade`` app registers that same object.
    """

    def register(fn: F) -> F:
        wrapped = handle_errors(fn)
        app.command(name)(wrapped)
        return wrapped

    return register


def make_main(app: typer.Typer) -> Callable[[], Any]:
    """The console-script entry point of ``app`` (typer's standalone mode: usage errors -> 2)."""

    def main() -> Any:
        _lossless_streams()
        return app()

    return main
