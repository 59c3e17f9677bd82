"""Torch datasets over a cache: index-sampled (validation) and random-sampled (training).

Every sample is a pair ``(x, y)``:

==============  ===================================  =================================================
``output``      ``x`` (mixture)                      ``y`` (one target / ``joint=True``)
==============  ===================================  =================================================
``magnitude``   ``(channels, bins, frames)`` float32  same / ``(targets, channels, bins, frames)``
``complex``     ``(channels, bins, frames)`` complex64 same / ``(targets, channels, bins, frames)``
``waveform``    ``(channels, samples)`` float32       same / ``(targets, channels, samples)``
==============  ===================================  =================================================

A DataLoader batch adds a leading ``batch`` axis: open-unmix's ``(nb_samples, nb_channels,
nb_bins, nb_frames)`` model input. Spectrograms are open-unmix's training STFT (``center=False``).

Random mode follows open-unmix's ``MUSDBDataset`` training semantics: ``samples_per_track``
excerpts per track and epoch; each source from its own random track (``random_track_mix``) at its
own random offset, scaled by a gain drawn from ``[0.25, 1.25)`` and channel-swapped with
probability 1/2; the mixture is the sum of the augmented sources. Offsets are whole hops, so the
stored STFT excerpt is exactly the STFT of the waveform excerpt and augmenting in the STFT domain
equals the STFT of the augmented waveform (the STFT is linear).

Randomness is drawn per sample from ``numpy.random.default_rng((seed, epoch, index))``: the same
seed gives the same samples with any number of DataLoader workers. Files are opened lazily in each
process, so the datasets are safe to use with worker processes.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass

import h5py
import numpy as np
import torch
import torch.utils.data

from umxtools.cache import MIXTURE, CacheMeta, open_cache
from umxtools.errors import CacheError, UsageError, check_choice
from umxtools.transforms import STFTSettings

# datasets kept open per process: each holds HDF5's chunk cache (up to 64 MiB decoded chunks of a
# compressed cache) and its chunk index, so a validation pass over every track of a large cache
# would otherwise keep all of them (memory growing with the number of tracks)
OPEN_DATASETS = 32


def _release_freed_memory() -> None:
    """Hand memory glibc holds freed back to the system (``malloc_trim``; elsewhere nothing).

    Whole-track samples allocate new buffers of each track's size. Below glibc's mmap threshold
    (which it raises up to 32 MB as large blocks are freed) they come from the heap, and the freed
    space stays in the process: validation over 60 toy tracks of 2 s grew from 150 to 700 MB of
    anonymous memory; trimming before each track keeps it at about 200 MB (about 10 ms a track).
    A fixed threshold (``mallopt``) did as well but slowed the training step by 10-25%.
    """
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:
        pass


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


OUTPUTS = ("magnitude", "complex", "waveform")
# the non-vocal sources summed, as open-unmix's "accompaniment" target (y = x - vocals)
ALIASES = {"accompaniment": ("drums", "bass", "other")}


def resolve_targets(meta: CacheMeta, targets: list[str]) -> list[tuple[str, ...]]:
    """Each target as the tuple of cache sources it sums (``drums+bass`` or an alias)."""
    resolved = []
    for target in targets:
        parts = ALIASES.get(target) or tuple(target.split("+"))
        missing = [p for p in parts if p not in meta.sources]
        if missing:
            raise CacheError(meta.path, f"has no source {missing[0]!r} (sources: {', '.join(meta.sources)})")
        resolved.append(parts)
    return resolved


class _CacheDataset(torch.utils.data.Dataset):
    """What both modes share: metadata, lazy per-process file handles, batch assembly.

    Subclasses implement ``_sample(index) -> (mix, targets)`` in the stored layout, float32:
    ``(frames, channels, 2, bins)`` spectrograms or ``(channels, samples)`` waveforms.
    """

    def __init__(
        self,
        cache: str | CacheMeta,
        targets: list[str] | str = "vocals",
        seq_dur: float | None = 6.0,
        output: str = "magnitude",
        joint: bool = False,
        expect: STFTSettings | None = None,
        allow_stale: bool = False,
    ):
        self.meta = cache if isinstance(cache, CacheMeta) else open_cache(cache, expect=expect, check_stale=not allow_stale)
        check_choice(output, OUTPUTS, "output")
        if output == "waveform" and not self.meta.attrs.get("waveforms"):
            raise CacheError(self.meta.path, "holds no waveforms (built with --no-waveforms); time-domain models need them")
        self.target_names = [targets] if isinstance(targets, str) else list(targets)
        if not joint and len(self.target_names) != 1:
            raise UsageError(None, "several targets need joint=True")
        self.targets = resolve_targets(self.meta, self.target_names)
        self.output, self.joint = output, joint
        s = self.meta.settings
        self.hop, self.nb_bins = s.n_hop, s.nb_bins
        self.seq_samples = None if seq_dur is None else int(seq_dur * s.sample_rate)
        self.seq_frames = None if seq_dur is None else s.nb_frames(self.seq_samples)
        if self.seq_frames is not None and self.seq_frames < 1:
            raise UsageError(None, f"seq_dur {seq_dur} s is shorter than one STFT frame")
        # waveforms are stored (channels, samples); spectrograms (frames, channels, 2, bins)
        self.kind = "wave" if output == "waveform" else "stft"
        self.channel_axis = 0 if output == "waveform" else 1
        self._file: h5py.File | None = None
        self._pid = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._map: np.memmap | None = None
        self._chunks: dict[str, list[np.ndarray] | None] = {}
        self._scratch: dict[tuple, np.ndarray | torch.Tensor] = {}

    # file handles are per process: h5py objects must not cross a fork into DataLoader workers
    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_file=None, _map=None, _pid=None, _datasets={}, _chunks={}, _scratch={})
        return state

    def _dataset(self, track: str, role: str) -> h5py.Dataset:
        if self._pid != os.getpid():
            # a 64 MiB chunk cache keeps compressed chunks that several excerpts share decoded
            self._file = h5py.File(self.meta.path, "r", rdcc_nbytes=64 * 2**20)
            # copy-on-write: numpy gets writable views (torch.from_numpy wants them), the file is
            # never written
            self._map = np.memmap(self.meta.path, dtype=np.uint8, mode="c")
            self._pid, self._datasets, self._chunks = os.getpid(), OrderedDict(), {}
        key = f"{track}/{self.kind}/{role}"
        d = self._datasets.get(key)
        if d is None:
            d = self._datasets[key] = self._file[f"tracks/{key}"]
            self._chunks[key] = self._chunk_views(d)
            if len(self._datasets) > OPEN_DATASETS:  # least recently used first
                old, _ = self._datasets.popitem(last=False)
                del self._chunks[old]
        else:
            self._datasets.move_to_end(key)
        return d

    def _chunk_views(self, d: h5py.Dataset) -> list[np.ndarray] | None:
        """Every chunk of an unfiltered chunked dataset as an array viewing the memory map.

        Reading excerpts through these views skips HDF5's copy into a read buffer: the float16
        -> float32 widening reads the page cache directly (about a fifth of a sample's time here).
        Filtered (compressed) datasets return None and go through ``read_direct``.
        """
        if d.chunks is None or d.compression is not None or d.shuffle or d.fletcher32 or d.scaleoffset is not None:
            return None
        axis = 1 if self.kind == "wave" else 0
        length = d.chunks[axis]
        views: list[np.ndarray | None] = [None] * (-(-d.shape[axis] // length))
        for i in range(d.id.get_num_chunks()):
            info = d.id.get_chunk_info(i)
            views[info.chunk_offset[axis] // length] = np.ndarray(d.chunks, d.dtype, buffer=self._map, offset=info.byte_offset)
        return None if any(v is None for v in views) else views

    def _drop_mapped_pages(self) -> None:
        """Unmap the pages of the cache read so far, after every batch (they come back from the
        page cache when read again). Without this an epoch's resident size grows with the data it
        has read, the memory map's file pages, which ``ps``, ``/usr/bin/time`` and a job's memory
        limit count alike: one epoch of 1 s excerpts over 100 tracks peaked at 840 MB against 470 MB
        with it, at the same samples per second (320-330, one thread, pages in the page cache)."""
        mapped = getattr(self._map, "_mmap", None)
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)

    def _excerpt(self, track) -> tuple[int, int]:
        """(offset unit, excerpt length) in stored units: hops and samples, or frames and frames."""
        if self.kind == "wave":
            return self.hop, self.seq_samples if self.seq_samples is not None else track.nb_samples
        return 1, self.seq_frames if self.seq_frames is not None else track.nb_frames

    def _buffer(self, name: str, shape: tuple, dtype) -> np.ndarray | torch.Tensor:
        """A scratch array reused from sample to sample (fixed-length excerpts only)."""
        key = (name, shape)
        buf = self._scratch.get(key)
        if buf is None:
            buf = np.empty(shape, dtype) if isinstance(dtype, np.dtype) else torch.empty(shape, dtype=dtype)
            if self.seq_frames is not None:  # whole tracks vary in length: keep no buffers for them
                self._scratch[key] = buf
        return buf

    def _read(self, track, role: str, start: int, length: int, name: str = "src") -> torch.Tensor:
        """A stored excerpt as float32 in the scratch buffer ``name``.

        Unfiltered datasets are read from memory-mapped chunks, filtered ones with ``read_direct``
        into a reused array; either way the float16 -> float32 widening is torch's vectorised copy,
        40x faster than numpy's ``astype`` here.
        """
        d = self._dataset(track.key, role)
        wave = self.kind == "wave"
        shape = (d.shape[0], length) if wave else (length,) + d.shape[1:]
        out = self._buffer(name, shape, torch.float32)
        views = self._chunks[f"{track.key}/{self.kind}/{role}"]
        if views is None:
            raw = self._buffer("raw", shape, d.dtype)
            d.read_direct(raw, np.s_[:, start:start + length] if wave else np.s_[start:start + length])
            return out.copy_(torch.from_numpy(raw))
        step = d.chunks[1 if wave else 0]
        pos = start
        while pos < start + length:
            chunk, within = divmod(pos, step)
            n = min(step - within, start + length - pos)
            src = views[chunk][:, within:within + n] if wave else views[chunk][within:within + n]
            dst = out[:, pos - start:pos - start + n] if wave else out[pos - start:pos - start + n]
            dst.copy_(torch.from_numpy(src))
            pos += n
        return out

    def _scaled(self, src: torch.Tensor, gain: float, swap: bool, into: torch.Tensor | None, name: str) -> torch.Tensor:
        """``into + gain * src`` in place, or ``gain * src`` in the scratch buffer ``name`` when
        ``into`` is None; the channels of ``src`` reversed if ``swap`` (open-unmix's channel swap)."""
        if into is None:
            into = self._buffer(name, tuple(src.shape), torch.float32)

            def op(dst, s):
                torch.mul(s, gain, out=dst)
        else:

            def op(dst, s):
                dst.add_(s, alpha=gain)
        if not swap:
            op(into, src)
            return into
        a = self.channel_axis
        last = src.shape[a] - 1
        for c in range(last + 1):
            op(into.select(a, c), src.select(a, last - c))
        return into

    def _sample(self, index: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch([index])
        return x[0], y[0]

    def batch_shapes(self, batch_size: int) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype]:
        """Shapes of ``x`` and ``y`` for a batch of fixed-length excerpts, and their dtype."""
        if self.seq_frames is None:
            raise UsageError(None, "whole tracks vary in length: their batches have no fixed shape")
        channels = self.meta.nb_channels
        one = (channels, self.seq_samples) if self.kind == "wave" else (channels, self.nb_bins, self.seq_frames)
        y = (batch_size, len(self.targets), *one) if self.joint else (batch_size, *one)
        return (batch_size, *one), y, torch.complex64 if self.output == "complex" else torch.float32

    def get_batch(self, indices: list[int], out: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Samples ``indices`` stacked: ``x`` ``(batch, ...)``, ``y`` ``(batch, [targets,] ...)``.

        Outputs are written straight into the batch tensors, ``out`` when given (the buffers of
        :class:`umxtools.batching.CacheLoader`), so no per-sample tensors are stacked.
        """
        x, y = out if out is not None else (None, None)
        for b, index in enumerate(indices):
            mix, ys = self._sample(index)
            if x is None:
                shape = self._out_shape(mix)
                dtype = torch.complex64 if self.output == "complex" else torch.float32
                x = torch.empty((len(indices), *shape), dtype=dtype)
                y = torch.empty((len(indices), len(ys), *shape) if self.joint else (len(indices), *shape), dtype=dtype)
            elif self._out_shape(mix) != x.shape[1:]:
                raise UsageError(None, "whole tracks of different lengths cannot share a batch; use batch size 1")
            self._write(mix, x[b])
            for k, t in enumerate(ys):
                self._write(t, y[b, k] if self.joint else y[b])
        self._drop_mapped_pages()
        return x, y

    def _out_shape(self, spec: torch.Tensor) -> tuple[int, ...]:
        if self.kind == "wave":
            return tuple(spec.shape)
        frames, channels, _, bins = spec.shape
        return (channels, bins, frames)

    def _write(self, spec: torch.Tensor, out: torch.Tensor) -> None:
        """Stored layout -> output layout. The arithmetic runs on contiguous (frames, channels,
        bins) planes and one ``copy_`` transposes: 2.5 ms a 6 s excerpt here, against 3.8 ms for
        the same arithmetic written through the transposed view."""
        if self.kind == "wave":
            out.copy_(spec)
            return
        re, im = spec[:, :, 0], spec[:, :, 1]  # (frames, channels, bins)
        if self.output == "complex":
            planes = torch.view_as_real(out)
            planes[..., 0].copy_(re.permute(1, 2, 0))
            planes[..., 1].copy_(im.permute(1, 2, 0))
            return
        mag = self._buffer("mag", tuple(re.shape), torch.float32)
        torch.mul(re, re, out=mag)
        mag.addcmul_(im, im).sqrt_()
        out.copy_(mag.permute(1, 2, 0))


@dataclass(frozen=True)
class Draw:
    """How one source enters a random-mode sample (exposed so tests can rebuild it from audio)."""

    source: str
    track: int  # index into meta.tracks
    offset: int  # in frames (hops)
    gain: float
    swap: bool


class IndexDataset(_CacheDataset):
    """Deterministic: every track cut into consecutive excerpts of ``seq_dur``, each once.

    With ``seq_dur=None`` every sample is a whole track (open-unmix validates on whole tracks with
    batch size 1). The mixture is the stored mixture (for MUSDB18, the real mix, as open-unmix's
    validation uses ``track.audio``); tracks without one (source-folder caches) are skipped.
    """

    def __init__(self, cache, targets="vocals", seq_dur: float | None = 6.0, **kwargs):
        super().__init__(cache, targets, seq_dur, **kwargs)
        self.items: list[tuple[int, int]] = []  # (track index, offset in frames)
        for i, t in enumerate(self.meta.tracks):
            if MIXTURE not in t.roles:
                continue
            if self.seq_frames is None:
                self.items.append((i, 0))
                continue
            limit = t.nb_frames - self.seq_frames
            if self.output == "waveform":
                limit = min(limit, (t.nb_samples - self.seq_samples) // self.hop)
            self.items += [(i, f) for f in range(0, limit + 1, self.seq_frames)]
        if not self.items:
            raise CacheError(self.meta.path, f"no track with a mixture is at least {seq_dur} s long")

    def __len__(self) -> int:
        return len(self.items)

    def _sample(self, index: int):
        i, frame = self.items[index]
        t = self.meta.tracks[i]
        if self.seq_frames is None:
            _release_freed_memory()  # the previous track's buffers
        step, length = self._excerpt(t)
        mix = self._read(t, MIXTURE, frame * step, length, name="mix")
        ys = []
        for k, parts in enumerate(self.targets):
            y = self._buffer(f"y{k}", tuple(mix.shape), torch.float32).zero_()
            for p in parts:
                if p in t.roles:
                    y += self._read(t, p, frame * step, length)
            ys.append(y)
        return mix, ys


class RandomDataset(_CacheDataset):
    """open-unmix's training sampler over a cache (see the module docstring).

    Sources missing from the sample's base track (source-folder and variable-source caches) are
    always drawn from a random track holding them.
    """

    def __init__(
        self,
        cache,
        targets="vocals",
        seq_dur: float = 6.0,
        samples_per_track: int = 64,
        random_track_mix: bool = True,
        gain: tuple[float, float] | None = (0.25, 1.25),
        channel_swap: bool = True,
        seed: int = 42,
        **kwargs,
    ):
        if seq_dur is None:
            raise UsageError(None, "random mode needs a seq_dur")
        super().__init__(cache, targets, seq_dur, **kwargs)
        self.samples_per_track = samples_per_track
        self.random_track_mix = random_track_mix
        self.gain, self.channel_swap, self.seed, self.epoch = gain, channel_swap, seed, 0
        self.eligible: dict[str, np.ndarray] = {}
        for source in self.meta.sources:
            ok = [i for i, t in enumerate(self.meta.tracks) if source in t.roles and self._max_offset(t) >= 0]
            self.eligible[source] = np.array(ok, dtype=np.int64)
        self.base = [i for i, t in enumerate(self.meta.tracks) if self._max_offset(t) >= 0]
        if not self.base:
            raise CacheError(self.meta.path, f"no track is at least {seq_dur} s long ({self.seq_frames} frames)")
        # aligned (input/output) caches hold a mixture that is not the sum of their sources
        self.additive = bool(json.loads(self.meta.attrs.get("dataset", "{}")).get("additive", True))

    def _max_offset(self, t) -> int:
        limit = t.nb_frames - self.seq_frames
        if self.output == "waveform":
            limit = min(limit, (t.nb_samples - self.seq_samples) // self.hop)
        return limit

    def set_epoch(self, epoch: int) -> None:
        """New excerpts each epoch (as DistributedSampler.set_epoch); :class:`umxtools.batching.CacheLoader` sets it."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base) * self.samples_per_track

    def draws(self, index: int) -> list[Draw]:
        """The random choices of sample ``index`` in the current epoch, one per source."""
        rng = np.random.default_rng((self.seed, self.epoch, index))
        base = self.base[index // self.samples_per_track]
        draws = []
        for source in self.meta.sources:
            pool = self.eligible[source]
            if len(pool) == 0:
                continue
            if self.random_track_mix or source not in self.meta.tracks[base].roles:
                track = int(pool[rng.integers(len(pool))])
            else:
                track = base
            offset = int(rng.integers(self._max_offset(self.meta.tracks[track]) + 1))
            gain = float(rng.uniform(*self.gain)) if self.gain else 1.0
            swap = bool(self.channel_swap and rng.random() < 0.5)
            draws.append(Draw(source, track, offset, gain, swap))
        return draws

    def _sample(self, index: int):
        if not self.additive:
            return self._aligned_sample(index)
        step, length = self._excerpt(None)
        mix = None
        ys: list[torch.Tensor | None] = [None] * len(self.targets)
        for d in self.draws(index):
            src = self._read(self.meta.tracks[d.track], d.source, d.offset * step, length)
            mix = self._scaled(src, d.gain, d.swap, mix, "mix")
            for k, parts in enumerate(self.targets):
                if d.source in parts:
                    ys[k] = self._scaled(src, d.gain, d.swap, ys[k], f"y{k}")
        # a target none of whose sources was drawn (a source-folder cache without them) is silence
        ys = [y if y is not None else self._buffer(f"y{k}", tuple(mix.shape), torch.float32).zero_() for k, y in enumerate(ys)]
        return mix, ys

    def _aligned_sample(self, index: int):
        rng = np.random.default_rng((self.seed, self.epoch, index))
        t = self.meta.tracks[self.base[index // self.samples_per_track]]
        step, length = self._excerpt(t)
        start = int(rng.integers(self._max_offset(t) + 1)) * step
        mix = self._read(t, MIXTURE, start, length, name="mix")
        ys = []
        for k, parts in enumerate(self.targets):
            y = self._buffer(f"y{k}", tuple(mix.shape), torch.float32).zero_()
            for p in parts:
                y += self._read(t, p, start, length)
            ys.append(y)
        return mix, ys
