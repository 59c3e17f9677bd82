"""Verifying a cache: checksums, tracks against the root settings, membership, statistics, inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from umxtools.audio import _first_line
from umxtools.cache import (
    MIXTURE,
    CacheMeta,
    Shard,
    _changed_inputs,
    _inputs_attr,
    _open_h5,
    _stat,
    crc32,
    open_cache,
    whole_statistics,
)
from umxtools.errors import UsageError


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
