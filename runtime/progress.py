"""The project's one progress bar: rich, on stderr (stdout stays for results), transient.

Counting bars (packing, thresholds, scoring) show N/M and a free ``note`` field (e.g. a rate);
transfer bars (weights downloads) show bytes and speed. Disabled bars render nothing, so callers
need no second code path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def progress_bar(enabled: bool = True, transfer: bool = False) -> Progress:
    """A rich ``Progress`` on stderr; add tasks with ``note=""`` unless ``transfer``."""
    columns: list[str | ProgressColumn] = [TextColumn("[bold]{task.description}"), BarColumn()]
    if transfer:
        columns += [DownloadColumn(), TransferSpeedColumn()]
    else:
        columns += [MofNCompleteColumn(), TextColumn("{task.fields[note]}")]
    columns.append(TimeRemainingColumn())
    return Progress(*columns, console=Console(stderr=True), transient=True, disable=not enabled)


@contextmanager
def counting(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """One counting bar for the ``with`` block; yields ``advance(n)``."""
    with progress_bar(enabled) as bar:
        task = bar.add_task(description, total=total, note="")

        def advance(n: int = 1) -> None:
            bar.advance(task, n)

        yield advance
