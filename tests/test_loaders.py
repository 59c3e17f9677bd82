"""umxtools.loaders against torch.stft of the same (augmented) waveform excerpts."""

from __future__ import annotations

import os
import re
import signal

import pytest
import soundfile as sf
import torch

from umxtools.cache import open_cache
from umxtools.errors import CacheError, UsageError
from umxtools.batching import CacheLoader
from umxtools.loaders import IndexDataset, RandomDataset

HOP = 1024


def _stft(wave: torch.Tensor) -> torch.Tensor:
    """open-unmix's training transform: (channels, samples) -> complex (channels, bins, frames)."""
    return torch.stft(wave, 4096, HOP, window=torch.hann_window(4096), center=False, normalized=False,
                      onesided=True, return_complex=True)


def _wave(root, name, source):
    return torch.from_numpy(sf.read(root / "train" / name / f"{source}.wav", dtype="float32", always_2d=True)[0].T.copy())


def _augmented(ds: RandomDataset, root, index: int, seconds: float):
    """Rebuild sample ``index`` from the wav files: excerpt, gain, channel swap, then sum."""
    n = int(seconds * 44100)
    parts = {}
    for d in ds.draws(index):
        w = _wave(root, ds.meta.tracks[d.track].name, d.source)[:, d.offset * HOP:d.offset * HOP + n]
        parts[d.source] = (w.flip(0) if d.swap else w) * d.gain
    return sum(parts.values()), parts


def _close_f16(got: torch.Tensor, ref: torch.Tensor):
    # each stored source carries float16 rounding (2**-11 relative); gains are <= 1.25, 4 sources
    scale = ref.abs().max()
    assert torch.allclose(got, ref, rtol=2**-9, atol=float(scale) * 2**-12), float((got - ref).abs().max() / scale)


def test_random_mode_equals_stft_of_augmented_waveform(toy_cache, toy_root):
    ds = RandomDataset(toy_cache, "vocals", seq_dur=3.0, samples_per_track=4, seed=7)
    seen_swap, seen_tracks = set(), set()
    for index in (0, 5, 11):
        draws = ds.draws(index)
        assert [d.source for d in draws] == ["vocals", "drums", "bass", "other"]
        assert all(0.25 <= d.gain < 1.25 for d in draws)
        seen_swap |= {d.swap for d in draws}
        seen_tracks |= {d.track for d in draws}
        x, y = ds[index]
        mix, parts = _augmented(ds, toy_root, index, 3.0)
        frames = 1 + (int(3.0 * 44100) - 4096) // HOP
        assert x.shape == y.shape == (2, 2049, frames) and x.dtype == torch.float32
        _close_f16(x, _stft(mix).abs())
        _close_f16(y, _stft(parts["vocals"]).abs())
    assert seen_swap == {True, False} and len(seen_tracks) > 1  # channel swap and random track mix happened


def test_complex_and_waveform_outputs(toy_cache, toy_root):
    cx = RandomDataset(toy_cache, "drums", seq_dur=2.0, output="complex", seed=3)
    x, y = cx[2]
    mix, parts = _augmented(cx, toy_root, 2, 2.0)
    assert x.dtype == torch.complex64
    _close_f16(torch.view_as_real(x), torch.view_as_real(_stft(mix)))
    _close_f16(torch.view_as_real(y), torch.view_as_real(_stft(parts["drums"])))
    wf = RandomDataset(toy_cache, ["vocals", "drums", "bass", "other"], seq_dur=2.0, output="waveform", joint=True, seed=3)
    x, y = wf[2]
    mix, parts = _augmented(wf, toy_root, 2, 2.0)
    assert x.shape == (2, 88200) and y.shape == (4, 2, 88200)
    assert torch.allclose(x, mix, atol=1e-6)
    for k, source in enumerate(["vocals", "drums", "bass", "other"]):
        assert torch.allclose(y[k], parts[source], atol=1e-6)
    assert torch.allclose(y.sum(0), x, atol=1e-6)  # the mixture is the sum of the augmented sources


def test_joint_and_accompaniment_targets(toy_cache, toy_root):
    ds = RandomDataset(toy_cache, ["vocals", "accompaniment"], seq_dur=2.0, joint=True, seed=1)
    x, y = ds[0]
    assert y.shape == (2, 2, 2049, 83)
    _, parts = _augmented(ds, toy_root, 0, 2.0)
    _close_f16(y[1], _stft(parts["drums"] + parts["bass"] + parts["other"]).abs())
    with pytest.raises(UsageError, match="several targets need joint=True"):
        RandomDataset(toy_cache, ["vocals", "drums"])
    with pytest.raises(CacheError, match="has no source 'piano'"):
        RandomDataset(toy_cache, "piano")


def test_index_mode_covers_each_excerpt_once(toy_cache, toy_root):
    ds = IndexDataset(toy_cache, "bass", seq_dur=2.0)
    meta = open_cache(toy_cache)
    frames = 1 + (88200 - 4096) // HOP  # 83
    per_track = (meta.tracks[0].nb_frames - frames) // frames + 1
    assert len(ds) == 4 * per_track
    assert ds.items[:per_track] == [(0, f * frames) for f in range(per_track)]
    x, y = ds[per_track + 1]  # second excerpt of the second track
    start = frames * HOP
    mix = _wave(toy_root, "toy_001", "mixture")[:, start:start + 88200]
    _close_f16(x, _stft(mix).abs())
    _close_f16(y, _stft(_wave(toy_root, "toy_001", "bass")[:, start:start + 88200]).abs())
    whole = IndexDataset(toy_cache, "bass", seq_dur=None)
    assert len(whole) == 4 and whole[3][0].shape == (2, 2049, meta.tracks[3].nb_frames)


def test_same_seed_same_batches_with_any_workers(toy_cache):
    ds = RandomDataset(toy_cache, "vocals", seq_dur=1.0, samples_per_track=4, seed=5)
    runs = []
    for workers in (0, 2):
        loader = CacheLoader(ds, batch_size=3, num_workers=workers, seed=11)
        loader.sampler.set_epoch(1)
        runs.append([b for b in loader])
    assert len(runs[0]) == 6 and runs[0][0][0].shape == (3, 2, 2049, 40)
    for (xa, ya), (xb, yb) in zip(*runs):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    loader = CacheLoader(ds, batch_size=3, num_workers=0, seed=11)
    loader.sampler.set_epoch(2)
    assert not torch.equal(next(iter(loader))[0], runs[0][0][0])  # a new epoch draws new excerpts
    # the plain per-sample path gives the same samples as the batched one
    loader.sampler.set_epoch(1)
    epoch, batch = next(iter(loader.sampler))
    ds.set_epoch(epoch)
    assert torch.equal(ds[batch[1]][0], runs[0][0][0][1])


def test_distributed_ranks_draw_disjoint_samples(toy_cache):
    ds = RandomDataset(toy_cache, "vocals", seq_dur=1.0, samples_per_track=4)
    shares = [set(i for _, batch in CacheLoader(ds, batch_size=4, rank=r, world_size=2).sampler for i in batch)
              for r in (0, 1)]
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == len(ds)


def test_too_short_excerpts_and_missing_waveforms(toy_cache, toy_root, tmp_path):
    with pytest.raises(CacheError, match="no track is at least 60.0 s long"):
        RandomDataset(toy_cache, seq_dur=60.0)
    from umxtools.cache import CacheOptions, build_cache
    from umxtools.datasets import MUSDB_SOURCES, musdb_tracks

    refs = musdb_tracks(toy_root, is_wav=True, subsets="test", split=None)
    out = build_cache(refs, tmp_path / "nw.h5", list(MUSDB_SOURCES), CacheOptions(waveforms=False), meta={"kind": "musdb"})
    with pytest.raises(CacheError, match="holds no waveforms"):
        RandomDataset(out, output="waveform")


def test_cache_loader_never_overwrites_a_batch_still_held(toy_cache):
    ds = RandomDataset(toy_cache, "vocals", seq_dur=1.0, samples_per_track=6, seed=2)
    for workers in (0, 2):
        loader = CacheLoader(ds, batch_size=4, num_workers=workers, seed=1)
        kept = []
        for i, (x, y) in enumerate(loader):
            if i % 2 == 0:
                kept.append((i, x, y))  # hold every other batch while the ring keeps cycling
        assert len(kept) == 3
        for i, x, y in kept:
            _, indices = list(loader.sampler)[i]
            ds.set_epoch(0)
            ref_x, ref_y = ds.get_batch(list(indices))
            assert torch.equal(x, ref_x) and torch.equal(y, ref_y)


def test_cache_loader_reports_worker_errors(toy_cache):
    from umxtools.errors import CacheError as Err

    ds = RandomDataset(toy_cache, "vocals", seq_dur=1.0, samples_per_track=2)

    def broken(index):
        raise Err(toy_cache, f"damaged track at sample {index}")

    ds._sample = broken  # inherited by the forked workers
    with pytest.raises(Err, match="damaged track at sample"):
        next(iter(CacheLoader(ds, batch_size=2, num_workers=2)))


def test_cache_loader_reports_a_killed_worker_in_one_line(toy_cache):
    """A loader worker killed (the kernel's OOM killer) surfaced as a RuntimeError traceback."""
    ds = RandomDataset(toy_cache, "vocals", seq_dur=1.0, samples_per_track=2)
    ds._sample = lambda index: os.kill(os.getpid(), signal.SIGKILL)  # in the forked workers
    with pytest.raises(CacheError) as caught:
        next(iter(CacheLoader(ds, batch_size=2, num_workers=2)))
    assert str(caught.value) == (f"{toy_cache}: a loader worker process died (killed by SIGKILL, out of memory?) while reading it; "
                                 "rerun with fewer workers if memory is short")


def test_cache_loader_reports_other_worker_failures_in_one_line(toy_cache):
    ds = RandomDataset(toy_cache, "vocals", seq_dur=1.0, samples_per_track=2)

    def broken(index):
        raise ValueError(f"bad sample {index}\nmore detail")

    ds._sample = broken
    with pytest.raises(CacheError) as caught:
        next(iter(CacheLoader(ds, batch_size=2, num_workers=2)))
    assert re.fullmatch(rf"{re.escape(str(toy_cache))}: a loader worker failed \(ValueError: bad sample \d+\)", str(caught.value))


@pytest.mark.parametrize("options", [{"compression": "lzf"}, {"compression": "zstd"}, {"chunk_frames": 7}, {"dtype": "float32"}])
def test_storage_options_give_the_same_samples(toy_root, tmp_path, options):
    """Filtered chunks go through HDF5's read path, small chunks through many memory-mapped pieces."""
    from umxtools.cache import CacheOptions, build_cache
    from umxtools.datasets import MUSDB_SOURCES, musdb_tracks

    refs = musdb_tracks(toy_root, is_wav=True, subsets="test", split=None)
    meta = {"kind": "musdb", "additive": True}
    plain = build_cache(refs, tmp_path / "plain.h5", list(MUSDB_SOURCES), meta=meta)
    other = build_cache(refs, tmp_path / "other.h5", list(MUSDB_SOURCES), CacheOptions(**options), meta=meta)
    for output in ("magnitude", "waveform"):
        a = RandomDataset(plain, "vocals", seq_dur=1.5, output=output, seed=4)
        b = RandomDataset(other, "vocals", seq_dur=1.5, output=output, seed=4)
        for i in (0, 9):
            (xa, ya), (xb, yb) = a[i], b[i]
            if options.get("dtype") == "float32" and output == "magnitude":
                _close_f16(xa, xb)  # float32 storage is the exact value float16 rounds
            else:
                assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_plain_dataloader_workers(toy_cache):
    """The datasets are ordinary torch datasets: a DataLoader with worker processes works."""
    ds = IndexDataset(toy_cache, "vocals", seq_dur=2.0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert sum(len(x) for x, _ in batches) == len(ds)
    assert torch.equal(batches[1][0][2], ds[6][0])


def test_whole_track_validation_keeps_a_bounded_set_of_datasets_open(toy_cache, monkeypatch):
    """Validation reads every track of a cache whole; each open HDF5 dataset keeps its chunk cache
    and chunk index, so the set kept open is bounded (least recently used closed first) and a
    closed dataset reopens to the same samples."""
    import umxtools.loaders as loaders

    monkeypatch.setattr(loaders, "OPEN_DATASETS", 3)
    ds = IndexDataset(open_cache(toy_cache), ["vocals", "drums"], seq_dur=None, joint=True)
    first = [ds[i] for i in range(len(ds))]
    assert len(ds._datasets) == 3 and set(ds._chunks) == set(ds._datasets)
    for i in reversed(range(len(ds))):  # every track's datasets reopened
        x, y = ds[i]
        assert torch.equal(x, first[i][0]) and torch.equal(y, first[i][1])
    assert len(ds._datasets) == 3


def _resident_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc to read the resident size")
def test_a_whole_track_pass_does_not_grow_with_the_number_of_tracks(toy_cache):
    """Reading every track whole must not keep what it read (the memory map's pages, HDF5's
    datasets, freed track buffers): the resident size grew by 65 MB over this pass when the
    memory map's pages were kept."""
    ds = IndexDataset(open_cache(toy_cache), ["vocals", "drums", "bass", "other"], seq_dur=None, joint=True)
    ds[0], ds[1]
    after_two = _resident_mb()
    for i in range(len(ds)):
        ds[i]
    assert len(ds) >= 4 and _resident_mb() - after_two < 20, _resident_mb() - after_two
