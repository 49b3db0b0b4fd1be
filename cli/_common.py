"""Shared CLI plumbing: typed errors become one red line and an exit code, never a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from spade_edge.runtime.errors import SpadeError
from spade_edge.runtime.fileio import write_atomic

err_console = Console(stderr=True, highlight=False)

KOpt = Annotated[int | None, typer.Option("--k", help="Sets both --k-image and --k-gallery.")]
KImageOpt = Annotated[
    int | None, typer.Option("--k-image", help="Nearest normal images averaged for the score.")
]
KGalleryOpt = Annotated[
    int | None,
    typer.Option(
        "--k-gallery", help="Nearest normal images whose positions form the pixel gallery."
    ),
]
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend", help="Runner: auto (engine file -> trt, else ort), ort, ort-gpu, trt."
    ),
]
MatcherOpt = Annotated[str, typer.Option("--matcher", help="kNN backend: numpy (CPU) or cuda.")]


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` to stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def make_main(app: typer.Typer) -> Callable[[], Any]:
    """Wrap a typer app so SpadeError / OSError / KeyboardInterrupt map to clean exits."""

    def main() -> Any:
        # OpenBLAS threads spin ~0.1 s after each GEMM, stealing both cores from the next
        # image's inference (wrn50: 160 ms instead of 117 ms here). Must be set before numpy
        # loads, which the CLIs do lazily; library users can export it themselves.
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
        try:
            return app(standalone_mode=False)
        except SpadeError as e:
            err_console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
            sys.exit(e.exit_code)
        except typer.Exit as e:
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            sys.exit(130)
        except Exception as e:  # click usage errors come through here in non-standalone mode
            import click

            if isinstance(e, click.exceptions.ClickException):
                e.show()
                sys.exit(e.exit_code)
            if isinstance(e, click.exceptions.Abort):
                sys.exit(1)
            raise

    return main


def resolve_k(
    k: int | None, k_image: int | None, k_gallery: int | None
) -> tuple[int | None, int | None]:
    """``--k`` sets both; ``--k-image`` / ``--k-gallery`` override each (None = gallery default)."""
    return (k_image if k_image is not None else k), (k_gallery if k_gallery is not None else k)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a report atomically so a crash never leaves half of it."""
    write_atomic(path, text.encode("utf-8"))


@contextmanager
def progress(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A transient rich progress bar on stderr; yields ``advance(n)`` (a no-op when disabled)."""
    if not enabled:
        yield lambda n=1: None
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)
