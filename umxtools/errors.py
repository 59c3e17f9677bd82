"""Exceptions raised by the library.

Every message names the file it is about and what is wrong with it; :mod:`umxtools.cli` alone
turns them into a one-line ``umxtools: error: PATH: problem`` and a non-zero exit code.
"""

from __future__ import annotations

from pathlib import Path


class UmxError(Exception):
    """Base class: an error a user can act on, about one file or argument."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)

    def __reduce__(self):
        # errors raised in decode worker processes travel back to the parent pickled
        return type(self), (self.path, self.problem)


class AudioError(UmxError):
    """Unreadable, empty, non-finite or otherwise unusable audio."""


class DatasetError(UmxError):
    """A dataset root or track that does not have the expected layout or content."""


class CacheError(UmxError):
    """A cache file that is missing, corrupt, incomplete or does not fit the request."""


class StaleCacheError(CacheError):
    """A cache whose input files changed after it was built."""


class UsageError(UmxError):
    """An argument value the library cannot work with (a bad shard spec, an unknown name)."""


class OutputError(UmxError):
    """An output location that cannot be written (missing, read-only, full), that is one of the
    command's inputs, or that holds files this command did not make."""


class LockedError(OutputError):
    """An output that another umxtools process is writing now (a second build of the same file)."""


class UnsafeNameError(UsageError):
    """A name read from a file or a flag (a target, a track, an aggregate) that would leave its folder."""


def check_choice(value, choices, what: str) -> None:
    """Raise :class:`UsageError` ``unknown WHAT 'value'; one of a, b`` unless ``value`` is one of
    ``choices`` (a registry's keys, listed in their order)."""
    if value not in choices:
        raise UsageError(None, f"unknown {what} {value!r}; one of {', '.join(choices)}")


class UntrustedCodeError(UmxError):
    """A model folder or file that would run Python code, without ``--trust-code``."""


class ScoreError(UmxError):
    """A score file that is corrupt or was made with other settings, or a track museval rejects."""


class TrainingError(UmxError):
    """Training that cannot go on (a NaN loss)."""


class ModelError(UmxError):
    """A model class that cannot be imported or built, or that breaks the model contract."""


class CheckpointError(UmxError):
    """A checkpoint that cannot be read, or that belongs to another run."""


class MsstError(UmxError):
    """An MSST config or checkpoint that cannot be read or does not fit its model."""
