"""Building a cache (resumable, sharded, parallel) and merging shards into one.

Building works in a folder of per-track part files beside the output: a finished track is a
renamed file, so ``kill -9`` loses at most the tracks in flight and the same command resumes.
The final file is assembled under a temporary name and renamed when complete. A build or merge
holds :func:`umxtools.fileio.exclusive` on the output for its whole run (parts folder included):
a second writer of the same output fails at once instead of mixing its tracks in.

Every file is written through :class:`umxtools.safe_hdf5._NewHDF5`, so a full disk is one line
and never an HDF5 crash. The format itself, encoding and reading are in :mod:`umxtools.cache`.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import re
import sys
from collections import deque
from contextlib import closing
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import h5py
import numpy as np

from umxtools import __version__, fileio, workers
from umxtools.cache import (
    FORMAT,
    FORMAT_VERSION,
    STD_REL_FLOOR,
    CacheOptions,
    Shard,
    _checked_root,
    _encode_checked,
    _inputs_attr,
    _open_h5,
    _stat,
    _where,
    _worker_init,
    crc32,
    whole_statistics,
)
from umxtools.cache_check import _checksum_problem, _track_problems
from umxtools.datasets import TrackRef
from umxtools.errors import CacheError, OutputError, UmxError, UsageError
from umxtools.safe_hdf5 import _NewHDF5

if TYPE_CHECKING:
    from umxtools.progress import Progress

Note = Callable[[str], None]  # a message for the user ("PATH: ..."), printed even without progress


# --- writing ---------------------------------------------------------------------------------


def _filters(compression: str) -> dict:
    if compression == "none":
        return {}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    import hdf5plugin

    return {**hdf5plugin.Zstd(clevel=3), "shuffle": True}


def _store(group: h5py.Group, name: str, data: np.ndarray, **kwargs) -> None:
    """A dataset with the ``crc32`` attribute that ``cache check`` verifies."""
    group.create_dataset(name, data=data, **kwargs).attrs["crc32"] = crc32(data)


def _write_part(path: Path, payload: dict, options: CacheOptions) -> None:
    """One track into its own small HDF5 file, under a temporary name, then renamed."""
    filters = _filters(options.compression)
    nb_channels = next(iter(payload["stft"].values())).shape[1]
    with fileio.atomic(path) as tmp, _NewHDF5(tmp) as w:
        g = w.file.create_group("track")
        for key in ("name", "index", "nb_samples", "nb_frames"):
            g.attrs[key] = payload[key]
        g.attrs["roles"] = json.dumps(list(payload["stft"]))
        g.attrs["inputs"] = json.dumps(payload["inputs"])
        for role, spec in payload["stft"].items():
            chunk = (min(options.chunk_frames, spec.shape[0]),) + spec.shape[1:]
            _store(g, f"stft/{role}", spec, chunks=chunk, **filters)
        for role, wave in payload["wave"].items():
            chunk = (nb_channels, min(options.chunk_frames * options.settings.n_hop, wave.shape[1]))
            _store(g, f"wave/{role}", wave, chunks=chunk, **filters)
        for role, moments in payload["moments"].items():
            _store(g, f"stats/{role}", moments)


def _identity(refs: list[TrackRef], options: CacheOptions, sources: list[str], shard: Shard, meta: dict) -> str:
    blob = json.dumps([[asdict(r) for r in refs], asdict(options), sources, str(shard), meta], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_cache(
    refs: list[TrackRef],
    out: str | Path,
    sources: list[str],
    options: CacheOptions = CacheOptions(),
    meta: dict | None = None,
    shard: Shard = Shard(),
    jobs: int = 1,
    force: bool = False,
    command: list[str] | None = None,
    progress: Progress | None = None,
    note: Note | None = None,
) -> Path:
    """Build a cache of ``refs`` (the tracks of ``shard``) at ``out``; returns ``out``.

    ``sources`` names the cache's sources (each track holds all or, for source-folder and
    variable-source datasets, some of them). ``meta`` records where the tracks came from (dataset
    kind, root, split). Resumes an interrupted build of the same command, and tells ``note`` what
    it reused and what it discarded. A failed build keeps its finished tracks in the parts
    folder ``.<out name>.parts/`` and its error says so. Refused: an ``out`` inside the dataset
    or equal to one of its files, an existing ``out`` without ``force``, an existing file that
    is not a cache even with ``force``, an output another process is building.
    """
    out = Path(out)
    meta = dict(meta or {})
    selected = [(i, r) for i, r in enumerate(refs) if shard.selects(i)]
    if not selected:
        raise CacheError(out, f"shard {shard} selects none of the {len(refs)} tracks")
    fileio.check_disjoint(out, _dataset_inputs(refs, meta), "dataset")
    fileio.check_writable(out.parent)
    with fileio.exclusive(out):  # held to the end: the parts folder is this build's alone
        _check_replaceable(out, force)
        _remove_dead_temporaries(out)
        work = _parts_folder(out)
        try:
            try:
                discarded = _open_parts(work, _identity(refs, options, sources, shard, meta), command)
                todo, changed = [], 0
                for i, ref in selected:
                    part = work / f"track-{i:05d}.h5"
                    if part.exists() and not _part_is_current(part):
                        part.unlink()
                        changed += 1
                    if not part.exists():
                        todo.append((ref, i, options))
                if note:
                    for message in _resume_notes(out, work, len(selected), len(selected) - len(todo), changed, discarded):
                        note(message)
                if progress:
                    progress("total", {"n": len(selected)})
                    progress("advance", {"n": len(selected) - len(todo)})
                with closing(_encoded(todo, jobs)) as encoded:
                    for payload in encoded:
                        _write_part(work / f"track-{payload['index']:05d}.h5", payload, options)
                        if progress:
                            progress("advance", {"n": 1})
            except OSError as exc:
                raise fileio.output_error(out, exc) from exc
            except OutputError as exc:
                if exc.path is not None and Path(exc.path).parent == work:
                    # a part file or the manifest: the parts folder is the build's business, the output the user's
                    raise OutputError(out, exc.problem) from exc
                raise
            attrs = {
                **_root_attrs(options, sources, command),
                "dataset": json.dumps(meta, sort_keys=True),
                "total_tracks": len(refs),
                "shard": str(shard) if shard.count > 1 else "",
            }
            _assemble(out, [(work / f"track-{i:05d}.h5", "track") for i, _ in selected], attrs)
        except UmxError as exc:
            raise _with_kept_parts(exc, work) from exc
        _clear_parts(work, remove=True)
    return out


def _resume_notes(out: Path, work: Path, total: int, reused: int, changed: int, discarded: int) -> list[str]:
    """What a build reuses from an earlier, interrupted one, and what it threw away."""
    notes = []
    if discarded:
        notes.append(f"{out}: {work}/ held {discarded} finished track(s) of another build (other flags, tracks or dataset); "
                     "discarded, building from scratch")
    if changed:
        notes.append(f"{out}: {changed} finished track(s) in {work}/ have input files that changed since; rebuilding them")
    if reused:
        notes.append(f"{out}: resuming: {reused} of {total} tracks already built in {work}/")
    return notes


def _finished_parts(work: Path) -> int:
    try:
        return sum(1 for p in work.iterdir() if _PART.fullmatch(p.name))
    except OSError:
        return 0


def _with_kept_parts(exc: UmxError, work: Path) -> UmxError:
    """``exc``, saying where the finished tracks wait for the next run (a hidden folder a user
    would not find otherwise); the folder is removed instead when it holds no finished track."""
    if _finished_parts(work) == 0:
        try:
            _clear_parts(work, remove=True)
        except UmxError:
            pass  # a foreign file in it, or the disk that failed: the folder stays, and so does the first error
        return exc
    if str(work) in str(exc):
        return exc  # the error is about the parts folder itself (a foreign file, a damaged part): it names it
    return type(exc)(exc.path, f"{exc.problem}; the {_finished_parts(work)} finished track(s) are kept in {work}/ "
                               "and the same command resumes from them")


def _dataset_inputs(refs: list[TrackRef], meta: dict) -> list[str]:
    """What a cache must not be written over or into: the dataset root and every input file."""
    inputs = [meta["root"]] if isinstance(meta.get("root"), str) else []
    for ref in refs:
        inputs += ref.files.values()
        if ref.kind == "module" and ref.module_spec.rsplit(":", 1)[0].endswith(".py"):
            inputs.append(ref.module_spec.rsplit(":", 1)[0])
    return list(dict.fromkeys(inputs))


def _is_cache(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT
    except Exception:  # h5py raises OSError, and others for odd files: none is a cache
        return False


def _check_replaceable(out: Path, force: bool) -> None:
    """An existing ``out`` is replaced only if it is a cache and ``force`` is given."""
    if not out.exists() and not out.is_symlink():
        return
    if not _is_cache(out):
        raise OutputError(out, "exists and is not a umxtools cache; it is left as it is: remove it yourself or choose another -o")
    if not force:
        raise CacheError(out, "exists; pass --force to replace it")


def _remove_dead_temporaries(out: Path) -> None:
    """Remove the temporary files of earlier writers of ``out`` (killed: we hold its lock now).

    They are named as :func:`umxtools.fileio.temp_path` names them, ``.<name>.<pid>-<hex>.tmp``.
    """
    pattern = re.compile(rf"\.{re.escape(out.name)}\.\d+-[0-9a-f]+\.tmp")
    try:
        leftovers = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name)]
        for path in leftovers:
            path.unlink()
    except OSError as exc:
        raise fileio.output_error(out.parent, exc) from exc


def _parts_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.parts"


_PART = re.compile(r"track-\d+\.h5")
_MANIFEST = "manifest.json"


def _open_parts(work: Path, identity: str, command: list[str] | None) -> int:
    """Make ``work`` hold the parts of the build ``identity``: kept if it already does, else
    emptied. Returns how many finished parts of another build were deleted."""
    manifest = work / _MANIFEST
    discarded = 0
    if work.exists():
        try:
            same = json.loads(manifest.read_text())["identity"] == identity
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        if not same:
            discarded = _finished_parts(work)
        _clear_parts(work, remove=False, keep_parts=same)
    work.mkdir(exist_ok=True)
    if not manifest.exists():
        fileio.write_json(manifest, {"identity": identity, "command": command})
    return discarded


def _clear_parts(work: Path, remove: bool, keep_parts: bool = False) -> None:
    """Delete what a build wrote in ``work`` (all of it, or only temporaries if ``keep_parts``),
    and ``work`` itself if ``remove``. A file that no build wrote is refused, and nothing deleted."""
    try:
        entries = sorted(work.iterdir())
    except OSError as exc:
        raise fileio.output_error(work, exc) from exc
    kept = []
    for path in entries:
        if path.name == _MANIFEST or _PART.fullmatch(path.name):
            kept.append(path)
        elif not (path.name.startswith(".") and path.name.endswith(".tmp")) or not path.is_file():
            raise OutputError(work, f"holds {path.name}, which no cache build wrote; remove it yourself, then rerun")
    try:
        for path in entries:
            if not (keep_parts and path in kept):
                path.unlink()
        if remove:
            work.rmdir()
    except OSError as exc:
        raise fileio.output_error(work, exc) from exc


def _part_is_current(part: Path) -> bool:
    """A finished part whose inputs still have the size and mtime they had when it was built."""
    try:
        with h5py.File(part, "r") as f:
            inputs = _inputs_attr(part, f["track"].attrs, "track")
    except (OSError, KeyError, CacheError):
        return False
    return all(_stat(i) == (i["size"], i["mtime_ns"]) for i in inputs)


def _encoded(todo: list[tuple], jobs: int) -> Iterator[dict]:
    """Encoded tracks in order; with ``jobs > 1`` decoded in worker processes, written here."""
    if jobs <= 1 or len(todo) <= 1:
        for job in todo:
            yield _encode_checked(*job)
        return
    pool = workers.pool(jobs, _worker_init)
    try:
        queue = iter(todo)
        pending = deque((pool.submit(workers.caught, _encode_checked, *job), job) for job in islice(queue, 2 * jobs))
        while pending:
            future, (ref, _, _) = pending.popleft()
            try:
                result = future.result()
            except cf.process.BrokenProcessPool:
                raise CacheError(_where(ref), f"the decode process of track {ref.name!r} died (out of memory?); "
                                              "rerun with fewer --jobs") from None
            nxt = next(queue, None)
            if nxt is not None:
                pending.append((pool.submit(workers.caught, _encode_checked, *nxt), nxt))
            if isinstance(result, UmxError):
                raise result
            yield result
    finally:
        # on an error (or Ctrl-C) queued tracks are dropped; those being decoded finish first
        pool.shutdown(wait=True, cancel_futures=True)


def _root_attrs(options: CacheOptions, sources: list[str], command: list[str] | None) -> dict:
    s = options.settings
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "umxtools_version": __version__,
        "command": json.dumps(command if command is not None else sys.argv),
        "sample_rate": s.sample_rate,
        "n_fft": s.n_fft,
        "n_hop": s.n_hop,
        "center": s.center,
        "window": s.window,
        "dtype": options.dtype,
        "compression": options.compression,
        "chunk_frames": options.chunk_frames,
        "waveforms": options.waveforms,
        "sources": json.dumps(list(sources)),
        "stats_std_rel_floor": STD_REL_FLOOR,
    }


def _assemble(out: Path, members: list[tuple[Path, str]], attrs: dict) -> None:
    """Copy track groups into a new file at ``out``, add whole-cache statistics, rename into place.

    ``members`` are ``(file, group path)`` in track order: part files (``track``) or shards
    (``tracks/NNNNN``). Each group is checked against ``attrs`` first, so a track of another
    build (another dtype, STFT size or hop) or with damaged statistics never enters the cache.
    """
    with fileio.atomic(out) as tmp, _NewHDF5(tmp) as w:
        f = w.file
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["complete"] = False
        tracks = f.create_group("tracks", track_order=True)
        nb_channels = None
        for path, group in members:
            with _open_h5(path) as src:
                g = src[group]
                problems = _track_problems(g, attrs, nb_channels)
                if not problems:  # the statistics feed /stats: a damaged one must not enter it
                    problems = [f"stats/{role}: {p}" for role in g["stats"]
                                if (p := _checksum_problem(g["stats"][role])) not in (None, "no checksum")]
                if problems:
                    raise CacheError(path, f"{group}: {problems[0]}; it does not belong in this cache (rebuild)")
                name = f"{int(g.attrs['index']):05d}"
                if name in tracks:
                    raise CacheError(path, f"track {int(g.attrs['index'])} appears twice")
                src.copy(g, tracks, name=name)
                nb_channels = g["stft"][next(iter(g["stft"]))].shape[1]
            w.check()
        f.attrs["nb_tracks"] = len(members)
        f.attrs["nb_channels"] = nb_channels
        for role, (mean, std, frames) in whole_statistics(tracks, json.loads(attrs["sources"])).items():
            _store(f, f"stats/{role}/mean", mean)
            _store(f, f"stats/{role}/std", std)
            f[f"stats/{role}"].attrs["frames"] = frames
        f.attrs["complete"] = True


# --- merging shards --------------------------------------------------------------------------

_SETTINGS_KEYS = ("format_version", "sample_rate", "n_fft", "n_hop", "center", "window", "dtype",
                  "compression", "chunk_frames", "waveforms", "sources", "dataset", "total_tracks")


def merge_caches(out: str | Path, shards: list[str | Path], force: bool = False, command: list[str] | None = None) -> Path:
    """Join shard files built with ``--shard K/N`` into one cache with recomputed statistics.

    Holds the output's lock like a build; a shard is never the output.
    """
    out = Path(out)
    if not shards:
        raise UsageError(None, "merge needs at least one shard file")
    shards = [Path(s) for s in shards]
    fileio.check_disjoint(out, shards, "shard")
    fileio.check_writable(out.parent)
    with fileio.exclusive(out):
        _check_replaceable(out, force)
        _remove_dead_temporaries(out)
        first_attrs = None
        index_to_file: dict[int, Path] = {}
        for s in shards:
            with _open_h5(s) as f:
                attrs = _checked_root(s, f)
                if first_attrs is None:
                    first_attrs = attrs
                for key in _SETTINGS_KEYS:
                    if attrs.get(key) != first_attrs.get(key):
                        raise CacheError(s, f"{key} is {attrs.get(key)!r}, but {shards[0]} has {first_attrs.get(key)!r}: shards of different builds")
                for name in f["tracks"]:
                    i = int(name)
                    if i in index_to_file:
                        raise CacheError(s, f"track {i} is also in {index_to_file[i]}")
                    index_to_file[i] = s
        total = int(first_attrs["total_tracks"])
        missing = sorted(set(range(total)) - set(index_to_file))
        if missing:
            raise CacheError(out, f"shards lack {len(missing)} of {total} tracks (first missing: {missing[0]}); is a shard missing?")
        attrs = {k: first_attrs[k] for k in first_attrs if k not in ("complete", "nb_tracks", "nb_channels", "command", "shard")}
        attrs["command"] = json.dumps(command if command is not None else sys.argv)
        attrs["shard"] = ""
        # the track groups are copied straight out of the shards, in track order
        _assemble(out, [(index_to_file[i], f"tracks/{i:05d}") for i in range(total)], attrs)
    return out
