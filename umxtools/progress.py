"""Progress: one callback protocol for every stage, and the CLI's renderers of it.

Every long-running library function (``cache``, ``separate_files``, ``evaluate``, ``oracle``,
``train``) takes ``progress: Progress | None``, a callable ``progress(event, info)`` with ``event``
a short name and ``info`` a dict of JSON-like values. The events:

- ``total`` ``{"n": N}``: the count of units (tracks, segments) the bar runs to; may come again.
- ``advance`` ``{"n": k}``: ``k`` more units are done.
- ``start`` / ``done`` ``{"file": i}`` (``separate_files``): file ``i`` of the input list begins or
  ends; its ``total`` and ``advance`` events carry ``"file": i`` too.
- ``train`` only: ``start`` (the run: model, device, epochs...), ``batch``, ``epoch``, ``stop`` and
  ``note`` ``{"message": "PATH: ..."}``; :class:`TrainProgress` says what each carries.

Library code never renders: it calls ``progress`` (or nothing when it is None). The renderers
below are the CLI's and the only place rich bars are drawn. This module's renderers import rich;
library modules import only the :data:`Progress` type, under ``TYPE_CHECKING``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _Bar

Progress = Callable[[str, dict], None]

stderr = Console(stderr=True)
_COLUMNS = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())


def note(message: str) -> None:
    """``umxtools: note: PATH: message`` on stderr, also with ``-q``: what a command did that the
    user may not expect (nothing at all, work reused, a default that changes the result)."""
    stderr.print(f"umxtools: note: {message}", markup=False, highlight=False, soft_wrap=True)


def _bars() -> _Bar:
    # transient: a bar leaves no line behind, so an error stays the only line on stderr; off where
    # stderr is not a terminal (a job's log file), where rich would leave a blank line
    return _Bar(*_COLUMNS, console=stderr, transient=True, disable=not stderr.is_terminal)


@contextmanager
def counter_bar(description: str, quiet: bool) -> Iterator[Progress | None]:
    """One bar for ``total``/``advance`` events (cache, evaluate, oracle); None with ``quiet``."""
    if quiet:
        yield None
        return
    with _bars() as bar:
        task = bar.add_task(description, total=None)

        def update(event: str, info: dict) -> None:
            if event == "total":
                bar.update(task, total=info["n"])
            elif event == "advance":
                bar.advance(task, info["n"])

        yield update


@contextmanager
def file_bars(names: list[str], quiet: bool) -> Iterator[Progress | None]:
    """One bar per file being separated, from ``start`` to ``done`` (events carry ``"file"``, the
    index into ``names``); None with ``quiet``."""
    if quiet:
        yield None
        return
    with _bars() as bar:
        tasks: dict[int, int] = {}

        def update(event: str, info: dict) -> None:
            index = info["file"]
            if event == "start":
                tasks[index] = bar.add_task(f"separating {names[index]}", total=None)
            elif event == "done":
                if index in tasks:
                    bar.remove_task(tasks.pop(index))
            elif index in tasks:
                if event == "total":
                    bar.update(tasks[index], total=info["n"])
                elif event == "advance":
                    bar.advance(tasks[index], info["n"])

        yield update


class TrainProgress:
    """Renders :func:`umxtools.training.train`'s events on stderr: a transient rich bar per epoch
    (batch, loss, samples/s) on a terminal, and one permanent log line per epoch (what a cluster
    job's log file keeps). ``quiet`` (``-q``) keeps only the notes.

    Events: ``start`` (resumed, targets, model, parameters, device, world_size, first_epoch,
    epochs, batches, output), ``batch`` (epoch, batch, batches, loss, samples_per_s), ``epoch``
    (epoch, epochs, train_loss, valid_loss or None, best, lr, seconds, samples_per_s, data_wait),
    ``stop`` (epoch, reason), ``note`` (message).
    """

    def __init__(self, quiet: bool = False):
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} samples/s"), TimeElapsedColumn())
        self.bar = _Bar(*columns, console=stderr, transient=True, disable=quiet or not stderr.is_terminal)
        self.quiet = quiet
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def __call__(self, event: str, info: dict) -> None:
        if event == "note":
            note(info["message"])
        elif self.quiet:
            return
        elif event == "start":
            verb = "resuming" if info["resumed"] else "training"
            stderr.print(f"{verb} {', '.join(info['targets'])}: {info['model']} ({info['parameters'] / 1e6:.2f} M parameters) on "
                         f"{info['device']}" + (f" x {info['world_size']} processes" if info["world_size"] > 1 else "")
                         + f", epochs {info['first_epoch']}..{info['epochs']}, {info['batches']} batches each -> {info['output']}",
                         highlight=False, soft_wrap=True)
        elif event == "batch":
            if self.task is None:
                self.task = self.bar.add_task("", total=info["batches"], loss="-", speed="-")
            self.bar.update(self.task, completed=info["batch"], description=f"epoch {info['epoch']}",
                            loss=f"{info['loss']:.4g}", speed=f"{info['samples_per_s']:.1f}")
        elif event == "epoch":
            if self.task is not None:
                self.bar.remove_task(self.task)
                self.task = None
            validated = info["valid_loss"] is not None  # None: training without --valid
            mark = "  best" if info["best"] and validated else ""
            valid = f"  valid {info['valid_loss']:.5g}" if validated else ""
            if validated and info.get("valid_sdr") is not None:  # --valid-metric sdr: what picks the best weights
                valid += f"  uSDR {info['valid_sdr']:.2f} dB"
            stderr.print(f"epoch {info['epoch']}/{info['epochs']}  train {info['train_loss']:.5g}{valid}  "
                         f"lr {info['lr']:.2g}  {info['seconds']:.1f} s  {info['samples_per_s']:.1f} samples/s  "
                         f"data wait {100 * info['data_wait']:.0f}%{mark}", highlight=False, soft_wrap=True)
        elif event == "stop":
            stderr.print(f"stopped after epoch {info['epoch']}: {info['reason']}", highlight=False, soft_wrap=True)
