"""The library's progress, rendered: a rich bar or spinner on a terminal, plain lines in a log.

Why here: the library never prints. Slow library calls take a callback instead
(``training.train.train(on_progress=...)`` gets :class:`TrainProgress` events,
``models.smollm2.ensure_base(progress=...)`` one line of text), and the CLI decides how
they look: a human at a terminal wants a live bar, a CI log wants a few stable lines.
Everything goes to the console it is given (stderr in the commands), so ``--json``
output on stdout stays one document.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from rich.console import Console

if TYPE_CHECKING:  # the events' type only: importing training (torch) is left to the train command
    from apar_spec.training.train import TrainProgress

LOG_LINES = 10  # plain-line mode: about this many step lines per run, plus every message


@contextmanager
def train_progress(console: Console, name: str) -> Iterator[Callable[[TrainProgress], None]]:
    """A ``train(on_progress=...)`` callback for the block: a bar (steps, loss, time) on a
    terminal, else every message and a line every ~10% of the steps."""
    if not console.is_terminal:
        yield lambda event: _log_line(console, name, event)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]train[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    task = bar.add_task(name, total=None, loss="-")

    def show(event: TrainProgress) -> None:
        if event.message:
            bar.console.print(event.message, markup=False, highlight=False)
        loss = "-" if event.loss is None else f"{event.loss:.3f}"
        bar.update(task, completed=event.step, total=event.total, loss=loss)

    with bar:
        yield show


def _log_line(console: Console, name: str, event: TrainProgress) -> None:
    if event.message:
        console.print(event.message, markup=False, highlight=False)
        return
    every = max(1, event.total // LOG_LINES)
    if event.loss is not None and (event.step % every == 0 or event.step == event.total):
        console.print(
            f"train {name}: step {event.step}/{event.total} loss {event.loss:.4f} {event.elapsed_s:.0f}s",
            markup=False,
            highlight=False,
        )


@contextmanager
def status_lines(console: Console) -> Iterator[Callable[[str], None]]:
    """A one-line-note callback (``smollm2.ensure_base(progress=...)``) for the block: a spinner
    with the latest note and the time spent on a terminal, stopped when the block ends;
    else each note as a line."""
    if not console.is_terminal:
        yield lambda note: console.print(f"apar-spec: {note}", markup=False, highlight=False)
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    spinner: Optional[Progress] = None
    task = None

    def show(note: str) -> None:
        nonlocal spinner, task
        if spinner is None:  # started by the first note: a block with nothing slow shows nothing
            spinner = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
            )
            spinner.start()
            task = spinner.add_task(f"apar-spec: {note}", total=None)
        else:
            spinner.update(task, description=f"apar-spec: {note}")

    try:
        yield show
    finally:
        if spinner is not None:
            spinner.stop()


def _needs_smollm2(name: str) -> bool:
    """A model or draft name that loads on the packaged SmolLM2 base (lists ``a,b``, unions ``a+b:8`` and
    ``NAME@N`` read part by part)."""
    for part in re.split(r"[+,]", name):
        part = part.split(":")[0].split("@")[0].strip()
        if part.startswith("smollm2"):
            return True
        path = Path(part).expanduser()
        if path.is_dir() and (path / "adapter.json").is_file():  # an APAR adapter folder: on the smollm2 base
            return True
    return False


def ensure_packaged_base(console: Console, *names: Optional[str]) -> None:
    """Build the SmolLM2 base cache now, with a spinner, if any of ``names`` loads on it.

    Why: the first load dequantizes the GGUF file (~20 s), silently in the library;
    doing it here first tells the user why they wait. A missing or broken package is
    left for the load itself to report, with its own message.
    """
    if not any(n and _needs_smollm2(str(n)) for n in names):
        return
    from apar_spec.models import smollm2

    with status_lines(console) as say:
        try:
            smollm2.ensure_base(progress=say)
        except smollm2.SmolLM2Error:
            pass
