"""Worker processes: the one pool that ``cache --jobs``, ``separate --jobs`` and ``eval --jobs`` use.

:func:`pool` is a :class:`concurrent.futures.ProcessPoolExecutor` whose workers

- are started with ``spawn``, never ``fork``: the parent has often run torch (or a BLAS) by the
  time it starts them, and a forked child of a process whose OpenMP or BLAS thread pool has run
  can hang in its first parallel region;
- ignore SIGINT (:func:`umxtools.interrupts.ignore_sigint`) before the caller's initializer
  runs: Ctrl-C reaches the whole process group, and the parent, which stops the pool, is the one
  to handle it (a worker that took it too would print its own KeyboardInterrupt traceback). An
  initializer may install its own handlers after that (``separate``'s workers drop the track
  they are writing);
- send errors back as values: a job wrapped in :func:`caught` returns a
  :class:`~umxtools.errors.UmxError` instead of raising it, so the parent reports it as the
  one line it is, with no worker traceback.

The training loader (:mod:`umxtools.batching`) keeps its own processes; its module says why.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from collections.abc import Callable

from umxtools import interrupts
from umxtools.errors import UmxError


def _start(initializer: Callable | None, initargs: tuple) -> None:
    interrupts.ignore_sigint()
    if initializer is not None:
        initializer(*initargs)


def pool(jobs: int, initializer: Callable | None = None, initargs: tuple = ()) -> cf.ProcessPoolExecutor:
    """``jobs`` spawned worker processes that ignore SIGINT, then run ``initializer(*initargs)``
    (a module-level function: spawn pickles it by name)."""
    ctx = multiprocessing.get_context("spawn")
    return cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_start, initargs=(initializer, initargs))


def caught(function: Callable, *args):
    """``function(*args)``, or the :class:`UmxError` it raised (returned, not raised: the parent
    reports it, with the track it was about). Other exceptions propagate as bugs do."""
    try:
        return function(*args)
    except UmxError as exc:
        return exc


def stop(executor: cf.ProcessPoolExecutor) -> None:
    """Terminate a pool's workers now, without finishing the jobs in flight (what
    ``ProcessPoolExecutor.terminate_workers`` does from Python 3.14)."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        try:
            process.terminate()
        except (ProcessLookupError, ValueError):  # gone already, or closed
            continue
    for process in processes:
        try:
            process.join(timeout=10)
        except (AssertionError, ValueError):
            continue
