"""Shared CLI plumbing: typed errors become one red line and an exit code, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from spade_edge.runtime.errors import SpadeError

err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` to stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def make_main(app: typer.Typer) -> Callable[[], Any]:
    """Wrap a typer app so SpadeError / OSError / KeyboardInterrupt map to clean exits."""

    def main() -> Any:
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
