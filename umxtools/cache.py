"""The HDF5 spectrogram cache: building (resumable, sharded, parallel), merging, checking, reading.

Layout (documented for h5py/h5ls users in ``docs/cache-format.md``)::

    /                      attrs: format, settings, sources, provenance, command, complete
    /tracks/NNNNN/         one group per track, NNNNN = index in the whole (unsharded) dataset
        stft/<role>        (frames, channels, 2, bins) float16|float32: real and imaginary planes,
                           chunked along frames
        wave/<role>        (channels, samples) float32, chunked along samples
        stats/<role>       (2, bins) float64: per-bin mean and M2 of the channel-mean magnitude
    /stats/<role>/mean,std (bins,) float64: whole-cache statistics (open-unmix get_statistics)

``role`` is ``mixture`` or a source name. The STFT is open-unmix's training transform
(``center=False``), so frame ``f`` covers samples ``[f * hop, f * hop + n_fft)``.

Building works in a folder of per-track part files beside the output: a finished track is a
renamed file, so ``kill -9`` loses at most the tracks in flight and the same command resumes.
The final file is assembled under a temporary name and renamed when complete. A build or merge
holds :func:`umxtools.fileio.exclusive` on the output for its whole run (parts folder included):
a second writer of the same output fails at once instead of mixing its tracks in.

HDF5 must never see a failed write: on a full disk it reports the error from object destructors
and then crashes the interpreter (measured with h5py 3.16 / HDF5 2.0 on a 200 kB tmpfs: ~170
lines of "Exception ignored" and a segfault). Every file is therefore written through
:class:`_GuardedFile`, which keeps the first OS error to itself and lets HDF5 finish; the writer
then raises that error, and :func:`umxtools.fileio.atomic` turns it into one line and removes the
temporary file.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import os
import re
import sys
import zlib
from collections import deque
from contextlib import closing
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import h5py
import numpy as np

from umxtools import __version__, fileio, workers
from umxtools.audio import _first_line
from umxtools.datasets import TrackRef, load_track
from umxtools.errors import CacheError, OutputError, StaleCacheError, UmxError, UsageError
from umxtools.transforms import STFTSettings

if TYPE_CHECKING:
    from umxtools.progress import Progress

FORMAT = "umxtools.cache"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
COMPRESSIONS = ("none", "lzf", "gzip", "zstd")
MIXTURE = "mixture"
# open-unmix floors the input scale at 1e-4 of its maximum (train.py, get_statistics)
STD_REL_FLOOR = 1e-4
# 64 frames x 2 channels x 2 x 2049 bins x float16 = 1 MiB: a 6 s excerpt (255 frames) spans
# at most 5 chunks, and a chunk fits HDF5's default 1 MiB chunk cache.
CHUNK_FRAMES = 64

Note = Callable[[str], None]  # a message for the user ("PATH: ..."), printed even without progress


@dataclass(frozen=True)
class CacheOptions:
    """How tracks are stored."""

    settings: STFTSettings = field(default_factory=STFTSettings)
    dtype: str = "float16"
    compression: str = "none"
    chunk_frames: int = CHUNK_FRAMES
    waveforms: bool = True
    resample: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise UsageError(None, f"unknown dtype {self.dtype!r}; one of {', '.join(DTYPES)}")
        if self.compression not in COMPRESSIONS:
            raise UsageError(None, f"unknown compression {self.compression!r}; one of {', '.join(COMPRESSIONS)}")
        if self.chunk_frames < 1:
            raise UsageError(None, "chunk frames must be at least 1")
        if self.settings.center:
            raise UsageError(None, "caches store open-unmix's training STFT, center=False")


@dataclass(frozen=True)
class Shard:
    """Track ``i`` of the dataset belongs to shard ``i % count == index``."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, spec: str | None) -> "Shard":
        if spec is None or spec == "":
            return cls()
        try:
            k, n = (int(x) for x in spec.split("/"))
        except ValueError:
            raise UsageError(None, f"shard {spec!r} is not K/N (e.g. 0/4)") from None
        if n < 1 or not 0 <= k < n:
            raise UsageError(None, f"shard {spec!r}: need 0 <= K < N")
        return cls(k, n)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def selects(self, i: int) -> bool:
        return i % self.count == self.index


# --- encoding one track (runs in decode workers) ---------------------------------------------


def _provenance(paths: Iterable[str]) -> list[dict]:
    out = []
    for p in paths:
        path = Path(p)
        try:
            st = path.stat()
        except OSError:
            out.append({"path": str(path.resolve()), "size": -1, "mtime_ns": -1})
            continue
        out.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def magnitude_moments(spec: np.ndarray) -> np.ndarray:
    """``(2, bins)`` float64 per-bin mean and M2 (sum of squared deviations) of one track.

    ``spec`` is ``(frames, channels, 2, bins)`` float32. As open-unmix's ``get_statistics``: the
    float32 magnitude is averaged over channels (in float32, as ``torch.mean``) and every frame is
    one observation; scikit-learn's StandardScaler then accumulates in float64, as here.
    """
    mag = np.sqrt(np.square(spec[:, :, 0]) + np.square(spec[:, :, 1])).mean(axis=1, dtype=np.float32)  # (frames, bins)
    mag = mag.astype(np.float64)
    mean = mag.mean(axis=0)
    m2 = np.square(mag - mean).sum(axis=0)
    return np.stack([mean, m2])


def encode_track(ref: TrackRef, index: int, options: CacheOptions) -> dict:
    """Decode a track and compute what the cache stores of it (arrays in their stored dtype)."""
    import torch  # workers import lazily; the parent may never need torch

    from umxtools.transforms import stft

    settings = options.settings
    track = load_track(ref, settings.sample_rate, options.resample)
    streams = dict(track.sources)
    if track.mixture is not None:
        streams = {MIXTURE: track.mixture, **streams}
    elif ref.kind != "sourcefolder":
        # a track folder without a mixture file: the mixture is the sum of its stems
        streams = {MIXTURE: np.sum(list(track.sources.values()), axis=0, dtype=np.float32), **streams}
    nb_samples = track.nb_samples
    frames = settings.nb_frames(nb_samples)
    if frames < 1:
        first = next(iter(ref.files.values()), ref.module_spec)
        raise CacheError(first, f"track {ref.name!r} has {nb_samples} samples, shorter than one STFT frame ({settings.n_fft})")
    win = torch.hann_window(settings.n_fft)
    payload = {"name": track.name, "index": index, "nb_samples": nb_samples, "nb_frames": frames,
               "inputs": _provenance(track.inputs), "stft": {}, "wave": {}, "moments": {}}
    for role, wave in streams.items():
        spec = stft(torch.from_numpy(wave), settings.n_fft, settings.n_hop, center=False, win=win)  # (C, F, T)
        # (T, C, 2, F): an excerpt is one contiguous read and real/imaginary planes keep the
        # loader's magnitude arithmetic on contiguous rows (3x faster than complex abs here)
        spec = torch.stack([spec.real, spec.imag], dim=2).permute(3, 0, 2, 1).contiguous()
        payload["moments"][role] = magnitude_moments(spec.numpy())
        # torch's float16 rounding (to nearest even, as numpy's) is 30x faster than astype here
        payload["stft"][role] = spec.to(getattr(torch, options.dtype)).numpy()
        if options.waveforms:
            payload["wave"][role] = np.ascontiguousarray(wave, dtype=np.float32)
    return payload


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one decode per process: --jobs processes share the cores


def _where(ref: TrackRef) -> str:
    """What names a track in an error: its first input file, or its item of a module dataset."""
    if ref.kind == "module":
        return f"{ref.module_spec}[{ref.index}]"
    return next(iter(ref.files.values()), ref.name)


def _encode_checked(ref: TrackRef, index: int, options: CacheOptions) -> dict:
    """:func:`encode_track`; an unexpected failure (a bug, no memory) becomes one line naming the track."""
    try:
        return encode_track(ref, index, options)
    except UmxError:
        raise
    except Exception as exc:  # in a worker a traceback would reach no one but stderr
        raise CacheError(_where(ref), f"encoding track {ref.name!r} failed ({type(exc).__name__}: {_first_line(exc)})") from exc


# --- writing ---------------------------------------------------------------------------------


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


def _filters(compression: str) -> dict:
    if compression == "none":
        return {}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    import hdf5plugin

    return {**hdf5plugin.Zstd(clevel=3), "shuffle": True}


def crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).data) & 0xFFFFFFFF


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


def _stat(entry: dict) -> tuple[int, int] | None:
    try:
        st = os.stat(entry["path"])
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


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


def whole_statistics(tracks: h5py.Group, sources: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """``role -> (mean, std, frames)`` of a cache from its tracks' stored moments, in track order.

    What a build stores under ``/stats`` and what ``cache check`` recomputes to compare.
    """
    moments: dict[str, list[np.ndarray]] = {}
    counts: dict[str, list[int]] = {}
    for key in tracks:
        g = tracks[key]
        for role in g["stats"]:
            moments.setdefault(role, []).append(g["stats"][role][()])
            counts.setdefault(role, []).append(int(g.attrs["nb_frames"]))
    if MIXTURE not in moments:
        moments[MIXTURE], counts[MIXTURE] = _mix_moments(tracks, sources)
    return {role: combine_moments(moments[role], counts[role]) for role in moments}


def _mix_moments(tracks: h5py.Group, sources: list[str]) -> tuple[list[np.ndarray], list[int]]:
    """Mixture statistics for caches of single-source files (source folders), which hold no mixture.

    As open-unmix's ``get_statistics`` on a SourceFolderDataset, the statistics come from mixes of
    the sources: mix ``k`` sums the ``k``-th file of every source (cycling through the shorter
    lists), cropped to the shortest, aligned at the start. The stored STFTs add up to the STFT of
    the summed waveform (the STFT is linear), in float32 from the stored values.
    """
    by_source: dict[str, list[h5py.Group]] = {s: [] for s in sources}
    for key in tracks:
        for role in json.loads(tracks[key].attrs["roles"]):
            by_source.setdefault(role, []).append(tracks[key])
    lists = [groups for groups in by_source.values() if groups]
    moments, counts = [], []
    for k in range(max(len(groups) for groups in lists)):
        chosen = [(groups[k % len(groups)], role) for role, groups in by_source.items() if groups]
        frames = min(int(g.attrs["nb_frames"]) for g, _ in chosen)
        mix = sum(g[f"stft/{role}"][:frames].astype(np.float32) for g, role in chosen)
        moments.append(magnitude_moments(mix))
        counts.append(frames)
    return moments, counts


def combine_moments(moments: list[np.ndarray], counts: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Merge per-track (mean, M2) with Chan et al.'s pairwise update, in track order.

    Returns the per-bin mean, the population std floored at ``STD_REL_FLOOR`` of its maximum (as
    open-unmix's ``get_statistics`` does with scikit-learn's StandardScaler), and the frame count.
    """
    n = 0
    mean = np.zeros_like(moments[0][0])
    m2 = np.zeros_like(moments[0][1])
    for (mean_b, m2_b), n_b in zip(moments, counts):
        total = n + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + np.square(delta) * (n * n_b / total)
        n = total
    std = np.sqrt(m2 / n)
    std = np.maximum(std, STD_REL_FLOOR * std.max())
    return mean, std, n


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


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackMeta:
    key: str  # group name under /tracks
    name: str
    nb_frames: int
    nb_samples: int
    roles: tuple[str, ...]


@dataclass(frozen=True)
class CacheMeta:
    """Everything a consumer needs to know about a cache, read once (files are reopened lazily)."""

    path: Path
    settings: STFTSettings
    dtype: str
    sources: tuple[str, ...]
    nb_channels: int
    tracks: tuple[TrackMeta, ...]
    attrs: dict

    @property
    def duration(self) -> float:
        return sum(t.nb_samples for t in self.tracks) / self.settings.sample_rate

    def statistics(self, role: str = MIXTURE) -> tuple[np.ndarray, np.ndarray]:
        """Per-bin ``(mean, std)`` of the channel-mean magnitude of ``role`` over the cache."""
        with _open_h5(self.path) as f:
            if f"stats/{role}" not in f:
                raise CacheError(self.path, f"has no statistics for {role!r}")
            return f[f"stats/{role}/mean"][()], f[f"stats/{role}/std"][()]


def _open_h5(path: Path, **kwargs) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise CacheError(path, "no such cache file (made by: umxtools cache musdb|folder|module SOURCE -o PATH)")
    try:
        return h5py.File(path, "r", **kwargs)
    except OSError as exc:
        raise CacheError(path, "not a readable HDF5 file (truncated or corrupt)") from exc


_ROOT_KEYS = ("sample_rate", "n_fft", "n_hop", "center", "window", "dtype", "compression", "chunk_frames", "waveforms",
              "nb_channels", "total_tracks")
_ROOT_JSON = {"sources": list, "dataset": dict, "command": list}


def _checked_root(path: Path, f: h5py.File) -> dict:
    """The root attributes, after checking format, version, completeness and that every attribute
    a reader uses is there (JSON ones parsed): a damaged cache is one line, never a traceback."""
    attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    if attrs.get("format") != FORMAT:
        raise CacheError(path, "not a umxtools cache (no format attribute)")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise CacheError(path, f"cache format version {attrs.get('format_version')}, this umxtools reads {FORMAT_VERSION}; rebuild it")
    if not attrs.get("complete"):
        raise CacheError(path, "incomplete cache (its build did not finish); rerun the cache command")
    if "tracks" not in f:
        raise CacheError(path, "has no tracks group (corrupt)")
    for key in _ROOT_KEYS:
        if key not in attrs:
            raise CacheError(path, f"attribute {key!r} is missing; the cache is damaged: rebuild it")
    for key, kind in _ROOT_JSON.items():
        _json_attr(path, attrs, key, kind)
    _names(path, attrs, "sources")
    if attrs["dtype"] not in DTYPES:
        raise CacheError(path, f"attribute 'dtype' is {attrs['dtype']!r}, not one of {', '.join(DTYPES)}; the cache is damaged: rebuild it")
    return attrs


def _json_attr(path: Path, attrs, key: str, kind: type, where: str = ""):
    """Attribute ``key`` parsed as JSON and of type ``kind``, or one line naming the cache and it."""
    what = f"attribute {key!r}" + (f" of {where}" if where else "")
    if key not in attrs:
        raise CacheError(path, f"{what} is missing; the cache is damaged: rebuild it")
    try:
        value = json.loads(attrs[key])
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, kind):
        raise CacheError(path, f"{what} is not a JSON {kind.__name__}; the cache is damaged: rebuild it")
    return value


def _names(path: Path, attrs, key: str, where: str = "") -> list[str]:
    names = _json_attr(path, attrs, key, list, where)
    if not all(isinstance(n, str) and n for n in names):
        raise CacheError(path, f"attribute {key!r}{f' of {where}' if where else ''} is not a list of names; the cache is damaged: rebuild it")
    return names


def _inputs_attr(path: Path, attrs, where: str) -> list[dict]:
    """A track's provenance: ``[{"path": str, "size": int, "mtime_ns": int}, ...]``."""
    inputs = _json_attr(path, attrs, "inputs", list, where)
    for entry in inputs:
        ok = isinstance(entry, dict) and isinstance(entry.get("path"), str)
        if not ok or not all(isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool) for k in ("size", "mtime_ns")):
            raise CacheError(path, f"attribute 'inputs' of {where} is not a list of {{path, size, mtime_ns}}; the cache is damaged: rebuild it")
    return inputs


def _track_meta(path: Path, key: str, g: h5py.Group) -> TrackMeta:
    where = f"track {key}"
    try:
        name, nb_frames, nb_samples = str(g.attrs["name"]), int(g.attrs["nb_frames"]), int(g.attrs["nb_samples"])
    except KeyError as exc:
        raise CacheError(path, f"{where} lacks an attribute ({_first_line(exc)}); the cache is damaged: rebuild it") from exc
    except (TypeError, ValueError) as exc:
        raise CacheError(path, f"{where} has a damaged attribute ({_first_line(exc)}); rebuild the cache") from exc
    return TrackMeta(key=key, name=name, nb_frames=nb_frames, nb_samples=nb_samples, roles=tuple(_names(path, g.attrs, "roles", where)))


def open_cache(path: str | Path, expect: STFTSettings | None = None, check_stale: bool = True) -> CacheMeta:
    """Read a cache's metadata, checking format, completeness, settings and staleness.

    Raises :class:`CacheError` when ``expect`` differs from the stored STFT settings and
    :class:`StaleCacheError` when an input file still exists but changed since the build (input
    files that are absent, e.g. on another machine, cannot be checked and are not an error).
    """
    path = Path(path)
    with _open_h5(path) as f:
        attrs = _checked_root(path, f)
        tracks = []
        for key in f["tracks"]:
            g = f["tracks"][key]
            tracks.append(_track_meta(path, key, g))
            if check_stale:
                changed = _changed_inputs(_inputs_attr(path, g.attrs, f"track {key}"))
                if changed:
                    raise StaleCacheError(path, f"stale: input {changed[0]} changed since the cache was built; rebuild it (or pass --allow-stale)")
    try:
        settings = STFTSettings(sample_rate=int(attrs["sample_rate"]), n_fft=int(attrs["n_fft"]), n_hop=int(attrs["n_hop"]),
                                center=bool(attrs["center"]), window=str(attrs["window"]))
        nb_channels = int(attrs["nb_channels"])
    except (TypeError, ValueError) as exc:
        raise CacheError(path, f"damaged STFT settings ({_first_line(exc)}); rebuild the cache") from exc
    if expect is not None:
        for key, want in expect.as_dict().items():
            have = getattr(settings, key)
            if have != want:
                raise CacheError(path, f"cache was built with {key}={have}, but {key}={want} was asked for; rebuild the cache or change the flag")
    return CacheMeta(path=path, settings=settings, dtype=str(attrs["dtype"]), sources=tuple(json.loads(attrs["sources"])),
                     nb_channels=nb_channels, tracks=tuple(tracks), attrs=attrs)


def _changed_inputs(inputs: list[dict]) -> list[str]:
    changed = []
    for entry in inputs:
        now = _stat(entry)
        if now is not None and now != (entry["size"], entry["mtime_ns"]):
            changed.append(entry["path"])
    return changed


def cache_summary(path: str | Path) -> dict:
    """What ``umxtools cache info`` shows."""
    meta = open_cache(path, check_stale=False)
    size = meta.path.stat().st_size
    hours = meta.duration / 3600
    a = meta.attrs
    return {
        "path": str(meta.path),
        "tracks": len(meta.tracks),
        "duration_s": round(meta.duration, 3),
        "sources": list(meta.sources),
        "sample_rate": meta.settings.sample_rate,
        "n_fft": meta.settings.n_fft,
        "n_hop": meta.settings.n_hop,
        "center": meta.settings.center,
        "dtype": meta.dtype,
        "compression": a["compression"],
        "waveforms": bool(a["waveforms"]),
        "shard": a.get("shard", ""),
        "dataset": json.loads(a["dataset"]),
        "size_bytes": size,
        "gb_per_hour": round(size / 1e9 / hours, 3) if hours else None,
        "umxtools_version": a.get("umxtools_version", "unknown"),
        "command": " ".join(map(str, json.loads(a["command"]))),
    }


# --- checking --------------------------------------------------------------------------------


def _checksum_problem(d: h5py.Dataset) -> str | None:
    """None when ``d``'s bytes match its ``crc32`` attribute; else what is wrong."""
    if "crc32" not in d.attrs:
        return "no checksum"
    try:
        ok = crc32(d[()]) == int(d.attrs["crc32"])
    except (OSError, TypeError, ValueError) as exc:
        return f"unreadable ({_first_line(exc)})"
    return None if ok else "checksum mismatch"


def _track_problems(g: h5py.Group, attrs: dict, nb_channels: int | None) -> list[str]:
    """How track group ``g`` disagrees with the cache's root ``attrs``: a track of another build
    (another dtype, STFT size, hop, chunking, waveforms or sources) or a damaged one."""
    try:
        nb_samples, nb_frames = int(g.attrs["nb_samples"]), int(g.attrs["nb_frames"])
        int(g.attrs["index"])
        roles = json.loads(g.attrs["roles"])
        sources = json.loads(attrs["sources"])
        n_fft, n_hop, chunk_frames = int(attrs["n_fft"]), int(attrs["n_hop"]), int(attrs["chunk_frames"])
    except (KeyError, TypeError, ValueError) as exc:
        return [f"damaged attributes ({_first_line(exc)})"]
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
        return ["attribute 'roles' is not a list of names"]
    problems = []
    if nb_frames != 1 + (nb_samples - n_fft) // n_hop:
        problems.append(f"{nb_frames} frames for {nb_samples} samples: not n_fft {n_fft}, hop {n_hop}")
    strangers = [r for r in roles if r != MIXTURE and r not in sources]
    if strangers:
        problems.append(f"role {strangers[0]!r} is not one of the cache's sources {sources}")
    bins = n_fft // 2 + 1
    waveforms = bool(attrs["waveforms"])
    if not waveforms and "wave" in g:
        problems.append("holds waveforms, but the cache was built without them")
    c = nb_channels
    if c is None and "stft" in g and roles[0] in g["stft"] and g["stft"][roles[0]].ndim == 4:
        c = g["stft"][roles[0]].shape[1]  # the first track of an assembly sets the channel count
    for kind in ("stft", "stats") + (("wave",) if waveforms else ()):
        stored = sorted(g[kind]) if kind in g else []
        if stored != sorted(roles):
            problems.append(f"{kind}/ holds {stored or 'nothing'}, but the track's roles are {roles}")
            continue
        for role in roles:
            d = g[kind][role]
            want = {"stft": (attrs["dtype"], (nb_frames, c, 2, bins), (min(chunk_frames, nb_frames), c, 2, bins)),
                    "wave": ("float32", (c, nb_samples), (c, min(chunk_frames * n_hop, nb_samples))),
                    "stats": ("float64", (2, bins), None)}[kind]
            if str(d.dtype) != want[0]:
                problems.append(f"{kind}/{role} is {d.dtype}, but the cache's {'dtype' if kind == 'stft' else kind} is {want[0]}")
            elif d.shape != want[1]:
                problems.append(f"{kind}/{role} has shape {d.shape}, expected {want[1]}")
            elif want[2] is not None and d.chunks != want[2]:
                problems.append(f"{kind}/{role} is stored in chunks of {d.chunks}, expected {want[2]}")
    return problems


@dataclass
class CheckReport:
    """What :func:`check_cache` found. ``problems`` make a cache unfit to use; ``notes`` do not."""

    path: Path
    tracks: int = 0
    checksums: int = 0  # datasets whose stored crc32 matched their bytes
    inputs: int = 0  # input files recorded
    absent: int = 0  # of those, not found here (a copied cache): not checked
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        if self.problems:
            return f"{len(self.problems)} problem(s) found"
        inputs = "inputs unchanged" if not self.absent else f"inputs unchanged ({self.absent} of {self.inputs} not found here, not checked)"
        return f"{self.tracks} tracks, all {self.checksums} checksums match, statistics agree with the tracks, {inputs}"


def check_cache(path: str | Path) -> CheckReport:
    """Verify everything a cache stores: the checksum of every dataset (spectrograms, waveforms,
    per-track and whole-cache statistics), that every track fits the root settings (a track of
    another build), that the track set is whole, that the statistics are those of the tracks,
    and that the input files did not change. Old caches without statistics checksums get a note."""
    meta = open_cache(path, check_stale=False)
    report = CheckReport(meta.path, tracks=len(meta.tracks))
    problems, attrs = report.problems, meta.attrs
    unchecked = 0
    with _open_h5(meta.path) as f:
        indices = []
        for t in meta.tracks:
            g = f["tracks"][t.key]
            label = f"track {t.name!r}"
            problems += [f"{label}: {p}" for p in _track_problems(g, attrs, meta.nb_channels)]
            try:
                indices.append(int(g.attrs["index"]))
            except (KeyError, TypeError, ValueError):
                pass
            for kind in ("stft", "wave", "stats"):
                for role in g[kind] if kind in g else ():
                    problem = _checksum_problem(g[kind][role])
                    if problem is None:
                        report.checksums += 1
                    elif problem == "no checksum" and kind == "stats":
                        unchecked += 1  # caches built before statistics had checksums
                    else:
                        problems.append(f"{label} {kind}/{role}: {problem}")
            inputs = _inputs_attr(meta.path, g.attrs, f"track {t.key}")
            report.inputs += len(inputs)
            report.absent += sum(_stat(i) is None for i in inputs)
            problems += [f"{label}: input {c} changed since the cache was built (stale)" for c in _changed_inputs(inputs)]
        problems += _membership_problems(meta, [t.key for t in meta.tracks], indices)
        if "stats" not in f:
            problems.append("/stats: missing")
        else:
            for role in f["stats"]:
                for part in ("mean", "std"):
                    d = f["stats"][role].get(part)
                    problem = "missing" if d is None else _checksum_problem(d)
                    if problem is None:
                        report.checksums += 1
                    elif problem == "no checksum":
                        unchecked += 1
                    else:
                        problems.append(f"/stats/{role}/{part}: {problem}")
            problems += _statistics_problems(f, json.loads(attrs["sources"]))
    if unchecked:
        report.notes.append(f"{unchecked} statistics datasets have no checksum (built by umxtools before they had one); "
                            "they were compared with the tracks' moments instead")
    return report


def _membership_problems(meta: CacheMeta, keys: list[str], indices: list[int]) -> list[str]:
    """A cache holds each track once, under its index, and all tracks of its shard."""
    a = meta.attrs
    problems = [f"group /tracks/{k} holds track index {i}" for k, i in zip(keys, indices) if k != f"{i:05d}"]
    try:
        total, count = int(a["total_tracks"]), int(a.get("nb_tracks", len(keys)))
        shard = Shard.parse(a.get("shard") or None)
    except (TypeError, ValueError, UsageError):
        return problems + ["damaged attributes total_tracks, nb_tracks or shard"]
    if count != len(keys):
        problems.append(f"holds {len(keys)} tracks, its nb_tracks attribute says {count}")
    want = [i for i in range(total) if shard.selects(i)]
    if sorted(indices) != want:
        extra = sorted(set(indices) - set(want))
        lacking = sorted(set(want) - set(indices))
        problems.append(f"track indices are not those of shard {shard} of {total} tracks "
                        f"({'extra: ' + str(extra[0]) if extra else 'first missing: ' + str(lacking[0]) if lacking else 'a track appears twice'})")
    return problems


def _statistics_problems(f: h5py.File, sources: list[str]) -> list[str]:
    """The stored ``/stats`` against the statistics recomputed from the tracks' moments."""
    try:
        recomputed = whole_statistics(f["tracks"], sources)
    except (KeyError, OSError, TypeError, ValueError) as exc:
        return [f"/stats: cannot be recomputed from the tracks ({_first_line(exc)})"]
    problems = []
    for role in sorted(set(recomputed) | set(f["stats"])):
        if role not in f["stats"] or role not in recomputed:
            problems.append(f"/stats/{role}: {'missing' if role not in f['stats'] else 'no track holds this role'}")
            continue
        mean, std, frames = recomputed[role]
        g = f["stats"][role]
        try:
            same = (np.array_equal(g["mean"][()], mean) and np.array_equal(g["std"][()], std)
                    and int(g.attrs["frames"]) == frames)
        except (KeyError, OSError, TypeError, ValueError):
            same = False
        if not same:
            problems.append(f"/stats/{role}: not the statistics of the cache's tracks (damaged, or assembled from other tracks)")
    return problems
