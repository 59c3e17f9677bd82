"""The HDF5 spectrogram cache: its format, encoding a track, statistics and reading.

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

Building (resumable, sharded, parallel) and merging live in :mod:`umxtools.cache_build`,
verifying in :mod:`umxtools.cache_check`; their public names are importable from here too.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from umxtools.audio import _first_line
from umxtools.datasets import TrackRef, load_track
from umxtools.errors import CacheError, StaleCacheError, UmxError, UsageError, check_choice
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
        check_choice(self.dtype, DTYPES, "dtype")
        check_choice(self.compression, COMPRESSIONS, "compression")
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


def crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).data) & 0xFFFFFFFF


def _stat(entry: dict) -> tuple[int, int] | None:
    try:
        st = os.stat(entry["path"])
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


# --- statistics ------------------------------------------------------------------------------


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


# --- building, merging, checking: in their own modules, importable from here ----------------

_ELSEWHERE = {
    "build_cache": "umxtools.cache_build",
    "merge_caches": "umxtools.cache_build",
    "check_cache": "umxtools.cache_check",
    "CheckReport": "umxtools.cache_check",
}


def __getattr__(name: str):
    # lazily: cache_build and cache_check import this module
    if name in _ELSEWHERE:
        import importlib

        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
