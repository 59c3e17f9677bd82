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
The final file is assembled under a temporary name and renamed when complete.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import h5py
import numpy as np

from umxtools import __version__
from umxtools.audio import _first_line
from umxtools.datasets import Track, TrackRef, load_track
from umxtools.errors import CacheError, StaleCacheError, UmxError, UsageError
from umxtools.transforms import STFTSettings

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

Progress = Callable[[str, int], None]


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
    import torch  # noqa: PLC0415  (workers import lazily; the parent may never need torch)

    from umxtools.transforms import stft  # noqa: PLC0415

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
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)


def _encode_job(args: tuple) -> dict | UmxError:
    ref, index, options = args
    try:
        return encode_track(ref, index, options)
    except UmxError as exc:  # returned, not raised: the parent reports it with the track's file
        return exc


# --- writing ---------------------------------------------------------------------------------


def _filters(compression: str) -> dict:
    if compression == "none":
        return {}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    import hdf5plugin  # noqa: PLC0415

    return {**hdf5plugin.Zstd(clevel=3), "shuffle": True}


def crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).data) & 0xFFFFFFFF


def _write_part(path: Path, payload: dict, options: CacheOptions) -> None:
    """One track into its own small HDF5 file, under a temporary name, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    filters = _filters(options.compression)
    nb_channels = next(iter(payload["stft"].values())).shape[1]
    with h5py.File(tmp, "w", track_order=True) as f:
        g = f.create_group("track")
        for key in ("name", "index", "nb_samples", "nb_frames"):
            g.attrs[key] = payload[key]
        g.attrs["roles"] = json.dumps(list(payload["stft"]))
        g.attrs["inputs"] = json.dumps(payload["inputs"])
        for role, spec in payload["stft"].items():
            chunk = (min(options.chunk_frames, spec.shape[0]),) + spec.shape[1:]
            d = g.create_dataset(f"stft/{role}", data=spec, chunks=chunk, **filters)
            d.attrs["crc32"] = crc32(spec)
        for role, wave in payload["wave"].items():
            chunk = (nb_channels, min(options.chunk_frames * options.settings.n_hop, wave.shape[1]))
            d = g.create_dataset(f"wave/{role}", data=wave, chunks=chunk, **filters)
            d.attrs["crc32"] = crc32(wave)
        for role, moments in payload["moments"].items():
            g.create_dataset(f"stats/{role}", data=moments)
    os.replace(tmp, path)


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
) -> Path:
    """Build a cache of ``refs`` (the tracks of ``shard``) at ``out``; returns ``out``.

    ``sources`` names the cache's sources (each track holds all or, for source-folder and
    variable-source datasets, some of them). ``meta`` records where the tracks came from (dataset
    kind, root, split). Resumes an interrupted build of the same command; refuses to replace an
    existing ``out`` unless ``force``.
    """
    out = Path(out)
    if out.exists() and not force:
        raise CacheError(out, "exists; pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(out.parent, f"cannot create folder ({exc.strerror})") from exc
    meta = dict(meta or {})
    selected = [(i, r) for i, r in enumerate(refs) if shard.selects(i)]
    if not selected:
        raise CacheError(out, f"shard {shard} selects none of the {len(refs)} tracks")
    work = out.parent / f".{out.name}.parts"
    identity = _identity(refs, options, sources, shard, meta)
    manifest = work / "manifest.json"
    if work.exists():
        try:
            same = json.loads(manifest.read_text())["identity"] == identity
        except (OSError, ValueError, KeyError):
            same = False
        if not same:
            shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    if not manifest.exists():
        manifest.write_text(json.dumps({"identity": identity, "command": command}))
    for leftover in work.glob(".*.tmp"):
        leftover.unlink()

    todo = []
    for i, ref in selected:
        part = work / f"track-{i:05d}.h5"
        if part.exists() and not _part_is_current(part):
            part.unlink()
        if not part.exists():
            todo.append((ref, i, options))
    if progress:
        progress("total", len(selected))
        progress("advance", len(selected) - len(todo))
    for payload in _encoded(todo, jobs):
        _write_part(work / f"track-{payload['index']:05d}.h5", payload, options)
        if progress:
            progress("advance", 1)

    parts = [work / f"track-{i:05d}.h5" for i, _ in selected]
    attrs = {
        **_root_attrs(options, sources, command),
        "dataset": json.dumps(meta, sort_keys=True),
        "total_tracks": len(refs),
        "shard": str(shard) if shard.count > 1 else "",
    }
    _assemble(out, parts, attrs, force=True)
    shutil.rmtree(work)
    return out


def _part_is_current(part: Path) -> bool:
    """A finished part whose inputs still have the size and mtime they had when it was built."""
    try:
        with h5py.File(part, "r") as f:
            inputs = json.loads(f["track"].attrs["inputs"])
    except (OSError, KeyError, ValueError):
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
            yield encode_track(*job)
        return
    # spawn, not fork: torch's thread pools do not survive fork safely
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init) as pool:
        pending: list[cf.Future] = []
        queue = iter(todo)
        for job in queue:
            pending.append(pool.submit(_encode_job, job))
            if len(pending) >= 2 * jobs:
                break
        while pending:
            result = pending.pop(0).result()
            nxt = next(queue, None)
            if nxt is not None:
                pending.append(pool.submit(_encode_job, nxt))
            if isinstance(result, UmxError):
                for f in pending:
                    f.cancel()
                raise result
            yield result


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


def _assemble(out: Path, parts: list[Path], attrs: dict, force: bool) -> None:
    """Copy finished track groups into a new file, add whole-cache statistics, rename into place."""
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.unlink(missing_ok=True)
    moments: dict[str, list[np.ndarray]] = {}
    counts: dict[str, list[int]] = {}
    nb_channels = None
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            for key, value in attrs.items():
                f.attrs[key] = value
            f.attrs["complete"] = False
            tracks = f.create_group("tracks", track_order=True)
            for part in parts:
                with h5py.File(part, "r") as p:
                    g = p["track"]
                    name = f"{int(g.attrs['index']):05d}"
                    if name in tracks:
                        raise CacheError(part, f"track {int(g.attrs['index'])} appears twice")
                    p.copy(g, tracks, name=name)
                    for role in g["stats"]:
                        moments.setdefault(role, []).append(g["stats"][role][()])
                        counts.setdefault(role, []).append(int(g.attrs["nb_frames"]))
                    nb_channels = g["stft"][next(iter(g["stft"]))].shape[1]
            f.attrs["nb_tracks"] = len(parts)
            f.attrs["nb_channels"] = nb_channels
            if MIXTURE not in moments:
                moments[MIXTURE], counts[MIXTURE] = _mix_moments(tracks, json.loads(attrs["sources"]))
            for role in moments:
                mean, std, count = combine_moments(moments[role], counts[role])
                f.create_dataset(f"stats/{role}/mean", data=mean)
                f.create_dataset(f"stats/{role}/std", data=std)
                f[f"stats/{role}"].attrs["frames"] = count
            f.attrs["complete"] = True
        if out.exists() and not force:
            raise CacheError(out, "exists; pass --force to replace it")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    """Join shard files built with ``--shard K/N`` into one cache with recomputed statistics."""
    out = Path(out)
    if out.exists() and not force:
        raise CacheError(out, "exists; pass --force to replace it")
    if not shards:
        raise UsageError(None, "merge needs at least one shard file")
    first_attrs = None
    index_to_file: dict[int, Path] = {}
    for s in shards:
        s = Path(s)
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
    # each track copied out of its shard into a part file keeps assembly to one code path
    work = out.parent / f".{out.name}.merge"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        parts = []
        for i in range(total):
            part = work / f"track-{i:05d}.h5"
            with h5py.File(index_to_file[i], "r") as src, h5py.File(part, "w", track_order=True) as dst:
                src.copy(src[f"tracks/{i:05d}"], dst, name="track")
            parts.append(part)
        attrs = {k: first_attrs[k] for k in first_attrs if k not in ("complete", "nb_tracks", "nb_channels", "command", "shard")}
        attrs["command"] = json.dumps(command if command is not None else sys.argv)
        attrs["shard"] = ""
        _assemble(out, parts, attrs, force=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
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


def _checked_root(path: Path, f: h5py.File) -> dict:
    attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    if attrs.get("format") != FORMAT:
        raise CacheError(path, "not a umxtools cache (no format attribute)")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise CacheError(path, f"cache format version {attrs.get('format_version')}, this umxtools reads {FORMAT_VERSION}; rebuild it")
    if not attrs.get("complete"):
        raise CacheError(path, "incomplete cache (its build did not finish); rerun the cache command")
    if "tracks" not in f:
        raise CacheError(path, "has no tracks group (corrupt)")
    return attrs


def open_cache(path: str | Path, expect: STFTSettings | None = None, check_stale: bool = True) -> CacheMeta:
    """Read a cache's metadata, checking format, completeness, settings and staleness.

    Raises :class:`CacheError` when ``expect`` differs from the stored STFT settings and
    :class:`StaleCacheError` when an input file still exists but changed since the build (input
    files that are absent, e.g. on another machine, cannot be checked and are not an error).
    """
    path = Path(path)
    try:
        with _open_h5(path) as f:
            attrs = _checked_root(path, f)
            tracks = []
            for key in f["tracks"]:
                g = f["tracks"][key]
                tracks.append(TrackMeta(key=key, name=str(g.attrs["name"]), nb_frames=int(g.attrs["nb_frames"]),
                                        nb_samples=int(g.attrs["nb_samples"]), roles=tuple(json.loads(g.attrs["roles"]))))
                if check_stale:
                    changed = _changed_inputs(json.loads(g.attrs["inputs"]))
                    if changed:
                        raise StaleCacheError(path, f"stale: input {changed[0]} changed since the cache was built; rebuild it (or pass --allow-stale)")
    except (KeyError, ValueError) as exc:
        raise CacheError(path, f"corrupt cache metadata ({exc})") from exc
    settings = STFTSettings(sample_rate=int(attrs["sample_rate"]), n_fft=int(attrs["n_fft"]), n_hop=int(attrs["n_hop"]),
                            center=bool(attrs["center"]), window=str(attrs["window"]))
    if expect is not None:
        for key, want in expect.as_dict().items():
            have = getattr(settings, key)
            if have != want:
                raise CacheError(path, f"cache was built with {key}={have}, but {key}={want} was asked for; rebuild the cache or change the flag")
    return CacheMeta(path=path, settings=settings, dtype=str(attrs["dtype"]), sources=tuple(json.loads(attrs["sources"])),
                     nb_channels=int(attrs["nb_channels"]), tracks=tuple(tracks), attrs=attrs)


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
        "umxtools_version": a["umxtools_version"],
        "command": " ".join(json.loads(a["command"])),
    }


def check_cache(path: str | Path) -> list[str]:
    """Problems found: checksum mismatches and changed inputs. An empty list means all is well."""
    meta = open_cache(path, check_stale=False)
    problems = []
    with _open_h5(meta.path) as f:
        for t in meta.tracks:
            g = f["tracks"][t.key]
            for kind in ("stft", "wave"):
                if kind not in g:
                    continue
                for role in g[kind]:
                    d = g[kind][role]
                    try:
                        ok = crc32(d[()]) == int(d.attrs["crc32"])
                    except (OSError, KeyError) as exc:
                        problems.append(f"track {t.name!r} {kind}/{role}: unreadable ({_first_line(exc)})")
                        continue
                    if not ok:
                        problems.append(f"track {t.name!r} {kind}/{role}: checksum mismatch")
            for changed in _changed_inputs(json.loads(g.attrs["inputs"])):
                problems.append(f"track {t.name!r}: input {changed} changed since the cache was built (stale)")
    return problems
