"""Writing a new HDF5 file so that HDF5 never sees a failed write.

HDF5 must never see a failed write: on a full disk it reports the error from object destructors
and then crashes the interpreter (measured with h5py 3.16 / HDF5 2.0 on a 200 kB tmpfs: ~170
lines of "Exception ignored" and a segfault). Every cache file is therefore written through
:class:`_GuardedFile`, which keeps the first OS error to itself and lets HDF5 finish; the writer
then raises that error, and :func:`umxtools.fileio.atomic` turns it into one line and removes the
temporary file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import h5py


class _GuardedFile(io.RawIOBase):
    """The file object h5py writes a new file through: an OS error is kept here, never raised into HDF5.

    After the first error (``ENOSPC``, ``EDQUOT``, ``EIO``) writes are dropped (the file is
    garbage and will be removed) and HDF5 carries on to close the file normally; the owner raises
    :attr:`error` afterwards. Reads return what is on disk.
    """

    def __init__(self, path: Path):
        super().__init__()
        self.error: OSError | None = None
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)  # fileio.atomic sets the mode
        self._pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._pos = pos
        elif whence == os.SEEK_CUR:
            self._pos += pos
        else:
            self._pos = os.fstat(self._fd).st_size + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        data = os.pread(self._fd, len(buffer), self._pos)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def write(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if self.error is None:
            done = 0
            try:
                while done < len(view):
                    done += os.pwrite(self._fd, view[done:], self._pos + done)
            except OSError as exc:
                self.error = exc
        self._pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as exc:
                self.error = exc
        return size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


class _NewHDF5:
    """``with _NewHDF5(tmp) as w:`` a new HDF5 file ``w.file`` at ``tmp``, written through
    :class:`_GuardedFile`; the OS error a write met is raised once the file is closed (inside
    :func:`umxtools.fileio.atomic`, which turns it into ``PATH: no space left on device``)."""

    def __init__(self, path: Path):
        self.raw = _GuardedFile(path)
        self.file: h5py.File | None = None

    def __enter__(self) -> "_NewHDF5":
        try:
            self.file = h5py.File(self.raw, "w", track_order=True)
        except BaseException:
            self.raw.close()
            raise
        return self

    def check(self) -> None:
        """Raise a kept OS error now: between tracks, so a full disk stops a build early."""
        if self.raw.error is not None:
            raise self.raw.error

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            self.file.close()
        except Exception:
            if kind is None and self.raw.error is None:
                raise
        finally:
            self.raw.close()
        error = self.raw.error
        if error is not None and exc is not error:
            raise error from exc  # what HDF5 made of the lost write is a consequence, not the cause
        return False
