"""The inputs of ``umxtools separate``: files, folders and list files, and their output names.

Output names: ``OUT/<input stem>/``; a file called ``mixture.*`` (MUSDB18-HQ's layout) is named
after its folder and a ``.stem.mp4`` after its name without ``.stem``, so separating a MUSDB18
split gives ``OUT/<track>/<target>.wav``, the layout ``umxtools eval`` reads. A name that is not a
plain file name (``..wav`` gives ``.``) is that input's error.

An input's problem (a folder without audio, a name that is not a plain file name, a name another
input already has) is its :class:`InputItem`'s ``error``: the other inputs are still separated.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from umxtools import fileio
from umxtools.errors import AudioError, UmxError, UsageError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3", ".mp4", ".m4a", ".aac")


@dataclass(frozen=True)
class InputItem:
    """One input: the file, its output folder name, or why it cannot be separated; ``given``:
    the argument it was found through (the file itself, or a folder holding it)."""

    path: Path
    name: str
    error: UmxError | None = None
    given: Path | None = None


def read_list(source: str | Path, stdin: Iterable[str] | None = None) -> list[str]:
    """Paths from a list file (``-``: ``stdin``), one a line; blank lines and ``#`` comments skipped."""
    if str(source) == "-":
        lines = list(stdin if stdin is not None else sys.stdin)
    elif Path(source).is_dir():
        raise UsageError(source, "is a folder; --list takes a file of input paths, one a line (a folder itself can be an input)")
    else:
        try:
            lines = Path(source).read_text().splitlines()
        except OSError as exc:
            raise UsageError(source, f"cannot read the input list ({exc.strerror or exc})") from exc
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def collect_inputs(items: Iterable[str | Path]) -> list[InputItem]:
    """Files as given; a folder holding ``mixture.*`` is that track; any other folder gives its
    audio files and its track subfolders (sorted). A later input whose output name repeats an
    earlier one is an error (its stems would overwrite the other's)."""
    found: list[InputItem] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files = _folder_inputs(path)
            if not files:
                found.append(InputItem(path, path.name, AudioError(path, "folder holds no audio files"), path))
            found += [_item(f, path) for f in files]
        else:
            found.append(_item(path, path))
    if not found:
        raise UsageError(None, "no inputs: give audio files, folders or a list of paths")
    seen: dict[str, Path] = {}
    out = []
    for it in found:
        if it.error is None and it.name in seen:
            it = InputItem(it.path, it.name, UsageError(it.path, f"has the same output name {it.name!r} as {seen[it.name]}"), it.given)
        elif it.error is None:
            seen[it.name] = it.path
        out.append(it)
    return out


def select_shard(items: list[InputItem], shard) -> list[InputItem]:
    """The inputs ``i`` with ``i % N == K`` of ``shard`` (:class:`umxtools.cache.Shard`); a shard
    that selects none is an error (a Slurm array with more tasks than inputs)."""
    chosen = [item for i, item in enumerate(items) if shard.selects(i)]
    if not chosen:
        raise UsageError(None, f"shard {shard} selects none of the {len(items)} input(s): use at most {len(items)} "
                               "shard(s) (Slurm array tasks)")
    return chosen


def _item(path: Path, given: Path) -> InputItem:
    if not path.exists():  # known before a model is loaded: a run of missing inputs ends without one
        return InputItem(path, output_name(path), AudioError(path, "no such file"), given)
    name = output_name(path)
    try:
        fileio.check_name(name, "output name", path)
    except UmxError as exc:
        return InputItem(path, name, exc, given)
    return InputItem(path, name, None, given)


def _mixture(folder: Path) -> Path | None:
    for suffix in AUDIO_SUFFIXES:
        if (folder / f"mixture{suffix}").is_file():
            return folder / f"mixture{suffix}"
    return None


def _folder_inputs(folder: Path) -> list[Path]:
    own = _mixture(folder)
    if own is not None:
        return [own]
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES]
    tracks = [m for p in entries if p.is_dir() and (m := _mixture(p)) is not None]
    return files + tracks


def output_name(path: Path) -> str:
    """The output folder name of an input file (see the module docstring)."""
    stem = path.stem
    if path.name.lower().endswith(".stem.mp4"):
        stem = path.name[: -len(".stem.mp4")]
    if stem == "mixture" and path.parent.name:
        return path.parent.resolve().name
    return stem
