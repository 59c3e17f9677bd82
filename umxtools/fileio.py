"""Writing files safely: the one home of every writer in the package and in ``bin/``.

Datasets that took weeks to assemble sit next to the outputs of umxtools on shared cluster file
systems, where a requeued Slurm job can start while its first run still writes. Every writer
therefore goes through these helpers:

- :func:`atomic` yields a temporary path beside the target (``.<name>.<pid>-<random>.tmp``: two
  processes never share one), and on success flushes it to disk, gives it the mode the umask
  allows (``tempfile.mkstemp`` would leave 0600, unreadable to colleagues) and renames it into
  place; on any error the temporary file is removed and OS errors become one line
  (``PATH: no space left on device``).
- :func:`exclusive` holds an ``flock`` on ``.<name>.lock`` beside an output for a whole build: a
  second build of the same output fails at once, naming the holder's pid and host. The kernel
  drops the lock of a killed process, so a requeued job is never blocked by a dead one.
- :func:`safe_child` is the only way a name read from a file or a flag (a target, a track, a
  score's target, an aggregate) becomes a path.
- :func:`check_disjoint`: an output is never one of the command's inputs, inside one, or around one.
- :func:`claim_folder`: a command writes only into a missing or empty folder, or one it made
  itself (its marker file, :data:`MARKER`); ``--force`` never widens that.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from umxtools import __version__
from umxtools.errors import LockedError, OutputError, UnsafeNameError

MARKER = ".umxtools.json"  # written by a command into every output folder it makes


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# the process umask, read once: os.umask can only be read by setting it, which is not thread-safe
_FILE_MODE = 0o666 & ~_umask()

_PROBLEMS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder",
    errno.EFBIG: "file too large for this file system",
}


def os_problem(exc: OSError) -> str:
    """A short lower-case description of an OS error, without Python's ``[Errno N]`` prefix."""
    return _PROBLEMS.get(exc.errno, (exc.strerror or str(exc)).lower())


def output_error(path: str | Path, exc: OSError) -> OutputError:
    """``OutputError(path, 'no space left on device')`` and the like, for an OS error on an output."""
    return OutputError(path, os_problem(exc))


def temp_path(path: str | Path, suffix: str = ".tmp") -> Path:
    """A temporary name beside ``path``, unique to this process and call (pid and random bits)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def leftovers(path: str | Path, suffix: str = ".tmp") -> list[Path]:
    """The temporaries of ``path`` (:func:`temp_path` names with ``suffix``) that exist now.

    Only names :func:`temp_path` makes for ``path`` itself match (not those of ``path.x``). They
    are a killed writer's only while no live one can exist: call this holding
    :func:`exclusive` on ``path``, the lock every writer of ``path`` holds.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.\d+-[0-9a-f]{{8}}{re.escape(suffix)}")
    try:
        return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:
        return []  # no folder yet: nothing left over


def remove_leftovers(path: str | Path, suffix: str = ".tmp") -> list[Path]:
    """Remove :func:`leftovers` of ``path`` (files or folders); call it holding :func:`exclusive`."""
    found = leftovers(path, suffix)
    for item in found:
        try:
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise output_error(item, exc) from exc
    return found


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself is still atomic
    finally:
        os.close(fd)


@contextmanager
def atomic(path: str | Path, suffix: str = ".tmp", mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    The caller writes the temporary file (any library: soundfile, h5py, matplotlib). On success
    it is fsynced, given ``mode`` (default: what the umask allows) and renamed over ``path``. On
    failure it is removed, and an ``OSError`` becomes :class:`OutputError` naming ``path``.
    ``suffix`` keeps a file extension that a writer reads to choose a format (``.png``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(path.parent, exc) from exc
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE if mode is None else mode)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise output_error(path, exc) from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_folder(path.parent)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic`)."""
    path = Path(path)
    with atomic(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode())


def write_json(path: str | Path, data, **dumps) -> Path:
    """Write ``data`` as JSON atomically; ``dumps`` goes to :func:`json.dumps` (indent, sort_keys)."""
    return write_text(path, json.dumps(data, **dumps) + "\n")


# --- locks -------------------------------------------------------------------------------------


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextmanager
def exclusive(path: str | Path, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (through ``.<name>.lock`` beside it) for the block.

    Raises :class:`LockedError` at once, naming the holder's pid and host, when another process
    holds it; with ``wait``, waits for it instead (for short critical sections that processes of
    one job take in turn, such as shards claiming their shared folder). The lock file is removed
    on release; a process killed while holding it leaves the file but not the lock (the kernel
    releases ``flock`` locks of dead processes).
    """
    path = Path(path)
    lock = lock_path(path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(lock.parent, exc) from exc
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except OSError as exc:
            raise output_error(lock, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockedError(path, f"another umxtools process is writing it ({holder}); wait for it to end or stop it") from None
        except OSError as exc:
            os.close(fd)
            raise output_error(lock, exc) from exc
        except BaseException:  # a signal while waiting (umxtools.interrupts): no descriptor leaks
            os.close(fd)
            raise
        # the holder we waited on may have removed the file before we locked it: lock the file
        # that is there now, or two processes would each hold a lock on a different inode
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
    except OSError as exc:
        os.close(fd)
        raise output_error(lock, exc) from exc
    try:
        yield
    finally:
        _unlink_quietly(lock)
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


# --- names and paths ---------------------------------------------------------------------------


def check_name(name: str, what: str = "name", where: str | Path | None = None) -> str:
    """``name`` if it can be one file or folder name inside a folder; else :class:`UnsafeNameError`.

    Refused: empty names, ``.`` and ``..``, path separators, absolute paths, NUL and other control
    characters. ``what`` says what the name is (``target``), ``where`` where it was read from.
    """
    problem = None
    if not isinstance(name, str) or not name:
        problem = "is empty"
    elif name in (".", ".."):
        problem = "is not a file name"
    elif "/" in name or "\\" in name or os.sep in name:
        problem = "contains a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "contains a control character"
    if problem:
        raise UnsafeNameError(where, f"{what} {name!r} {problem}; it must be a plain file name")
    return name


def safe_child(folder: str | Path, name: str, what: str = "name", where: str | Path | None = None) -> Path:
    """``folder / name`` for a ``name`` read from a file or a flag, checked by :func:`check_name`."""
    return Path(folder) / check_name(name, what, where)


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_disjoint(output: str | Path, inputs: Iterable[str | Path], what: str = "input") -> None:
    """Refuse an ``output`` that is, contains, or lies inside one of ``inputs`` (links resolved).

    An input file beside the output folder is fine; an input file inside it is not.
    """
    out = _real(output)
    for item in inputs:
        if item is None:
            continue
        inp = _real(item)
        if _within(out, inp):
            relation = "is" if out == inp else "lies inside"
            raise OutputError(output, f"{relation} the {what} {item}; write the output somewhere else (-o)")
        if _within(inp, out):
            raise OutputError(output, f"contains the {what} {item}; write the output somewhere else (-o)")


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and make sure a file can be written in it, before any work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_path(folder / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise output_error(folder, exc) from exc
    return folder


# --- output folders a command made --------------------------------------------------------------


def made_by(folder: str | Path) -> str | None:
    """The command whose marker ``folder`` holds, or None (no marker, or an unreadable one)."""
    try:
        doc = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return doc.get("command") if isinstance(doc, dict) and isinstance(doc.get("command"), str) else None


def claim_folder(folder: str | Path, command: str, extra: dict | None = None) -> Path:
    """Make ``folder`` this command's output folder, or refuse it.

    Accepted: a missing folder, an empty one, or one holding the marker of the same ``command``
    (a rerun, a resumed or requeued job, another shard). Anything else (a dataset, another
    command's output, unmarked files) is refused with :class:`OutputError`, ``--force`` or not.
    The marker records the command, the version and ``extra``.
    """
    folder = Path(folder)
    owner = made_by(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(folder, "is a file, not a folder")
    if owner is None:
        try:
            entries = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        except OSError as exc:
            raise output_error(folder, exc) from exc
        # our own leftovers (locks, temporaries) do not make a folder someone else's
        foreign = [n for n in entries if not (n.startswith(".") and (n.endswith(".lock") or n.endswith(".tmp")))]
        if foreign:
            # another process of a command (a shard of the same array) may have claimed the folder
            # between the two looks: its marker, then its files, are what we found
            owner = made_by(folder)
            if owner is None:
                raise OutputError(folder, f"holds files that 'umxtools {command}' did not make ({sorted(foreign)[0]}, ...); "
                                          "choose an empty or new folder (-o)")
    if owner is not None and owner != command:
        raise OutputError(folder, f"holds the output of 'umxtools {owner}', not of 'umxtools {command}'; choose another folder (-o)")
    check_writable(folder)
    if owner is None:
        write_json(folder / MARKER, {"command": command, "umxtools_version": __version__, **(extra or {})}, indent=2)
    return folder


def remove_tree(folder: str | Path, marker: str) -> None:
    """Remove ``folder`` only if it holds the file ``marker`` (what proves the caller made it).

    ``marker`` is a file name inside ``folder`` (``separation.json``, :data:`MARKER`). Anything
    else is refused: ``--force`` replaces a command's own output, never a folder of something else.
    """
    folder = Path(folder)
    if folder.is_symlink() or not (folder / marker).is_file():
        raise OutputError(folder, f"was not made by umxtools (no {marker} in it); it is left as it is: remove it yourself or choose another -o")
    shutil.rmtree(folder)
