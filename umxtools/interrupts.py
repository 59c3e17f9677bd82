"""Ending a run cleanly on SIGTERM and SIGINT, so that a requeued job finds no half-written output.

Slurm ends a job (``scancel``, preemption, ``scontrol requeue``, the time limit) with SIGTERM to
every process of the job, then SIGKILL after ``KillWait`` (30 s by default); Ctrl-C sends SIGINT to
the terminal's process group. Python's default for SIGTERM ends the process at once: no
``finally`` runs, so temporary files, staging folders and worker processes stay behind. Inside
:func:`interruptible` both signals raise :class:`Interrupted` in the main thread instead, so every
``finally`` and context manager on the way out cleans up (:func:`umxtools.fileio.atomic` removes
its temporary file, a track's staging folder is removed, worker pools are stopped), and
``umxtools.cli.main`` prints one line and exits with ``128 + signum`` (143 for SIGTERM, 130 for
SIGINT), the code a shell reports for a process that the signal ended.

API (used by ``eval`` and ``oracle``; any command that writes per-track outputs can use it)::

    with interruptible():             # in a command, around the library call
        run()                         # the first SIGTERM or SIGINT raises Interrupted(signum)

    received()                        # the Interrupted of the current block, or None
    raise_if_received()               # re-raise it (e.g. where a worker died of the same signal)
    ignore_sigint()                   # initializer of worker processes (see below)

Rules:

- :class:`Interrupted` is a ``BaseException``, as ``KeyboardInterrupt`` is, so library code that
  catches ``Exception`` (a decoder's errors) does not swallow it.
- One signal is raised once: a second SIGTERM or SIGINT while the first one's cleanup runs is
  ignored, so that cleanup finishes (Slurm's SIGKILL still ends a cleanup that hangs).
- A block that ends normally after a signal (code that caught :class:`Interrupted` and went on)
  raises it at its end: a signal is never lost.
- Blocks nest (the outermost one handles the signals); outside the main thread, where Python
  cannot install signal handlers, :func:`interruptible` does nothing.
- Worker processes (``spawn``) call :func:`ignore_sigint` first: Ctrl-C reaches the whole process
  group, and the parent alone decides to stop them (it terminates them), so no worker prints its
  own ``KeyboardInterrupt`` traceback. SIGTERM keeps its default in workers: a worker holds no
  output file (the parent writes), so ending it at once loses nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: What a stopped track stage keeps: its finished outputs (every track is written atomically).
TRACKS_KEPT = "finished tracks are kept, a rerun continues"


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived inside :func:`interruptible`.

    ``signum`` is the signal's number, ``name`` its name (``SIGTERM``); ``str()`` is the line the
    CLI prints after ``umxtools: `` (``stopped by SIGTERM; finished tracks are kept, a rerun
    continues``), and the process exits with ``128 + signum``.
    """

    def __init__(self, signum: int, kept: str = TRACKS_KEPT):
        self.signum = int(signum)
        self.kept = kept
        super().__init__(signum, kept)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {self.name}; {self.kept}"


class _Block:
    def __init__(self, kept: str):
        self.kept = kept
        self.received: Interrupted | None = None


_block: _Block | None = None  # the outermost active block (signal handlers run in the main thread)


def _handle(signum, frame) -> None:
    block = _block
    if block is None or block.received is not None:
        return  # already stopping: let the cleanup run
    block.received = Interrupted(signum, block.kept)
    raise Interrupted(signum, block.kept)


@contextmanager
def interruptible(kept: str = TRACKS_KEPT) -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted` for the block (see the module docstring).

    ``kept`` says what the stopped command leaves behind, for the one line the CLI prints.
    """
    global _block
    if _block is not None or threading.current_thread() is not threading.main_thread():
        yield
        return
    block = _Block(kept)
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _block = block
    try:
        for s in SIGNALS:
            signal.signal(s, _handle)
        yield
        if block.received is not None:  # caught and dropped inside the block: not lost
            raise Interrupted(block.received.signum, kept)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _block = None


def received() -> Interrupted | None:
    """The signal the current :func:`interruptible` block received, or None."""
    block = _block
    return None if block is None else block.received


def raise_if_received() -> None:
    """Raise :class:`Interrupted` again if the current block received a signal."""
    got = received()
    if got is not None:
        raise Interrupted(got.signum, got.kept)


def ignore_sigint() -> None:
    """Initializer of worker processes: Ctrl-C is the parent's to handle (it stops the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
