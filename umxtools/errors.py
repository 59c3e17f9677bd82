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
