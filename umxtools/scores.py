"""Score files: one JSON per track, museval's layout plus an ``umxtools`` block.

The format :func:`umxtools.evaluation.evaluate_estimates` writes and ``umxtools report`` reads:
museval's ``{"targets": [{"name", "frames": [{"time", "duration", "metrics"}]}]}`` written by
museval's serializer (simplejson, NaN kept), with the run's settings in ``"umxtools"`` (see
docs/eval.md). Reading, writing under the track's lock, and the settings check that keeps one
folder to one set of settings live here, beside each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from umxtools import fileio
from umxtools.errors import LockedError, ScoreError

if TYPE_CHECKING:
    from umxtools.references import References

SCORE_FORMAT = "umxtools-scores"
SCORE_FORMAT_VERSION = 1
# settings a resumed run must share with the score files already there
RUN_KEYS = ("backend", "mode", "win", "hop", "targets")



def to_json(doc: dict) -> str:
    """A score document as museval writes it (simplejson, NaN allowed, Decimals kept)."""
    import simplejson  # museval's own serializer; a museval dependency

    return simplejson.dumps(doc, indent=2, allow_nan=True, use_decimal=True)


def read_scores(path: str | Path) -> dict:
    """Parse a score JSON (museval's or umxtools'); :class:`ScoreError` if it is not one."""
    import simplejson

    path = Path(path)
    try:
        doc = simplejson.loads(path.read_text(), allow_nan=True)
    except (OSError, UnicodeDecodeError, simplejson.JSONDecodeError) as exc:
        raise ScoreError(path, f"corrupt score file ({exc})") from exc
    targets = doc.get("targets") if isinstance(doc, dict) else None
    ok = isinstance(targets, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("frames"), list)
        and all(isinstance(f, dict) and isinstance(f.get("metrics"), dict) for f in t["frames"])
        for t in targets
    )
    if not ok:
        raise ScoreError(path, "corrupt score file (not museval's format: no 'targets' list of named frame lists)")
    return doc


def score_path(output: str | Path, references: References, track: str) -> Path:
    """``output/<prefix>/<track>.json``; :class:`UnsafeNameError` for a track name that is no plain file name."""
    return Path(output) / references.prefix / f"{fileio.check_name(track, 'track')}.json"


def file_state(path: Path) -> tuple[int, int, int] | None:
    """What tells one version of a file from another: inode, size, mtime (None: no file)."""
    try:
        st = path.stat()
    except OSError:  # missing (or unreadable: writing it then reports why)
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def settings_problem(doc: dict, settings: dict) -> str | None:
    """Why a score document cannot share a folder with this run's scores, or None."""
    block = doc.get("umxtools")
    if not isinstance(block, dict):
        return "not written by umxtools eval (no 'umxtools' block), its settings are unknown"
    for key in RUN_KEYS:
        if block.get(key) != settings[key]:
            old, new = block.get(key), settings[key]
            if key == "targets":
                old = ",".join(map(str, old)) if isinstance(old, list) else old
                new = ",".join(new)
            return f"scored with {key} {old}, this run asks for {new}"
    return None


def remove_leftovers_of(path: Path) -> None:
    """Remove the temporary score files of ``path`` that killed runs left (under its lock; a
    track another process holds now keeps its files)."""
    if not fileio.leftovers(path):
        return
    try:
        with fileio.exclusive(path):
            fileio.remove_leftovers(path)
    except LockedError:
        pass


def write_scores(path: Path, text: str, seen: tuple | None, settings: dict) -> None:
    """Write one track's score file, unless another run wrote it with other settings meanwhile.

    ``seen`` is the file as this run found it before scoring (:func:`file_state`). The check and
    the write hold the track's lock, so two runs cannot both pass the check and then both write.
    """
    with fileio.exclusive(path):
        fileio.remove_leftovers(path)  # a killed writer's temporaries: no live one exists under the lock
        if file_state(path) != seen:
            try:
                problem = settings_problem(read_scores(path), settings)
            except ScoreError:
                problem = None  # unreadable: nothing worth keeping
            if problem:
                raise ScoreError(path, f"another run wrote it while this one scored the track ({problem}); "
                                 "it is left as it is: score into another folder")
        fileio.write_text(path, text)
