"""umxtools.cache and `umxtools cache`: contents against torch.stft, statistics, shards, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch

from umxtools.cache import CacheOptions, Shard, build_cache, merge_caches, open_cache
from umxtools.datasets import MUSDB_SOURCES, musdb_tracks
from umxtools.errors import CacheError, StaleCacheError, UsageError
from umxtools.transforms import STFTSettings
from tests.conftest import SAMPLE, error_line, need_shared

REPO = Path(__file__).resolve().parents[1]


def _stft_ref(wave: np.ndarray) -> np.ndarray:
    """open-unmix's training STFT of (channels, samples), as (frames, channels, 2, bins) float32."""
    spec = torch.stft(torch.from_numpy(wave), n_fft=4096, hop_length=1024, window=torch.hann_window(4096),
                      center=False, normalized=False, onesided=True, return_complex=True)  # (C, F, T)
    return torch.stack([spec.real, spec.imag], 2).permute(3, 0, 2, 1).numpy()


def _wav(path) -> np.ndarray:
    return sf.read(path, dtype="float32", always_2d=True)[0].T.copy()


def _datasets(path: Path) -> dict[str, bytes]:
    """Every track dataset's bytes, keyed by track name and dataset path."""
    out = {}
    with h5py.File(path, "r") as f:
        for key in f["tracks"]:
            g = f["tracks"][key]
            g.visititems(lambda name, obj: out.__setitem__(f"{g.attrs['name']}/{name}", obj[()].tobytes())
                         if isinstance(obj, h5py.Dataset) else None)
    return out


def test_stored_stft_and_waves_match_the_audio(toy_cache, toy_root):
    meta = open_cache(toy_cache)
    assert [t.name for t in meta.tracks] == ["toy_000", "toy_001", "toy_002", "toy_003"]
    assert meta.sources == MUSDB_SOURCES and meta.dtype == "float16" and meta.nb_channels == 2
    with h5py.File(toy_cache, "r") as f:
        for t in meta.tracks[:2]:
            for role in ("mixture", "vocals", "bass"):
                wave = _wav(toy_root / "train" / t.name / f"{role}.wav")
                np.testing.assert_array_equal(f[f"tracks/{t.key}/wave/{role}"][()], wave)
                ref = _stft_ref(wave)
                stored = f[f"tracks/{t.key}/stft/{role}"][()]
                assert stored.shape == ref.shape == (t.nb_frames, 2, 2, 2049)
                scale = np.abs(ref).max()
                # float16 keeps 11 significant bits: relative error <= 2**-11
                np.testing.assert_allclose(stored.astype(np.float32), ref, rtol=2**-10, atol=scale * 2**-14)


def test_statistics_equal_open_unmix_get_statistics(toy_cache, toy_root):
    """open-unmix: StandardScaler over frames of the channel-mean magnitude of each whole mixture;
    std floored at 1e-4 of its max. Recomputed here from the wavs, all frames at once."""
    frames = []
    for name in ["toy_000", "toy_001", "toy_002", "toy_003"]:
        wave = torch.from_numpy(_wav(toy_root / "train" / name / "mixture.wav"))
        spec = torch.stft(wave, 4096, 1024, window=torch.hann_window(4096), center=False, return_complex=True)
        frames.append(spec.abs().mean(0).T.double().numpy())  # float32 |X|, channel mean: (frames, bins)
    frames = np.concatenate(frames)
    mean, std = frames.mean(0), frames.std(0)
    std = np.maximum(std, 1e-4 * std.max())
    got_mean, got_std = open_cache(toy_cache).statistics("mixture")
    # float32 magnitudes may differ by an ulp (torch's |z| is hypot, ours sqrt(re^2 + im^2))
    np.testing.assert_allclose(got_mean, mean, rtol=1e-7)
    np.testing.assert_allclose(got_std, std, rtol=1e-7)
    with h5py.File(toy_cache, "r") as f:
        assert f["stats/mixture"].attrs["frames"] == len(frames)
        assert set(f["stats"]) == {"mixture", *MUSDB_SOURCES}


def test_cli_builds_stems_and_hq_alike(run_cli, tmp_path):
    root = need_shared(SAMPLE)
    a, b = tmp_path / "stems.h5", tmp_path / "hq.h5"
    r = run_cli("cache", "musdb", root / "stems", "--split", "all", "-q", "-o", a)
    assert r.code == 0, r.err
    assert r.out.strip() == str(a)
    r = run_cli("cache", "musdb", root / "hq", "--is-wav", "--split", "all", "-q", "-o", b)
    assert r.code == 0, r.err
    da, db = _datasets(a), _datasets(b)
    assert da.keys() == db.keys() and len(da) == 3 * 5  # stft, wave, stats for 5 roles
    assert all(da[k] == db[k] for k in da)
    np.testing.assert_array_equal(open_cache(a).statistics()[1], open_cache(b).statistics()[1])
    info = run_cli("cache", "info", a, "--json")
    summary = json.loads(info.out)
    assert summary["tracks"] == 1 and summary["sources"] == list(MUSDB_SOURCES)
    assert 6.5 < summary["duration_s"] < 7.5 and summary["gb_per_hour"] > 0


def test_refuses_to_overwrite_without_force(run_cli, toy_root, toy_cache, tmp_path):
    out = tmp_path / "c.h5"
    out.write_bytes(toy_cache.read_bytes())
    r = run_cli("cache", "musdb", toy_root, "--is-wav", "--split", "all", "-q", "-o", out)
    assert error_line(r) == f"umxtools: error: {out}: exists; pass --force to replace it"
    assert out.read_bytes() == toy_cache.read_bytes()
    r = run_cli("cache", "musdb", toy_root, "--is-wav", "--subsets", "test", "-q", "--force", "-o", out)
    assert r.code == 0 and [t.name for t in open_cache(out).tracks] == ["toy_004", "toy_005"]


@pytest.mark.parametrize("command", ["build", "merge"])
def test_force_never_replaces_a_file_that_is_not_a_cache(run_cli, toy_root, toy_cache, tmp_path, command):
    """The accident: -o pointed at the wrong file (a results table, a checkpoint); --force out of habit."""
    out = tmp_path / "results.h5"
    out.write_bytes(b"weeks of results")
    args = (["cache", "musdb", toy_root, "--is-wav", "--split", "all", "-q", "--force", "-o", out] if command == "build"
            else ["cache", "merge", out, toy_cache, "--force"])
    r = run_cli(*args)
    assert error_line(r) == (f"umxtools: error: {out}: exists and is not a umxtools cache; it is left as it is: "
                             "remove it yourself or choose another -o")
    assert out.read_bytes() == b"weeks of results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.h5"]


def test_shards_merge_to_the_single_build(toy_root, toy_cache, tmp_path):
    refs = musdb_tracks(toy_root, is_wav=True, subsets="train", split=None)
    meta = {"kind": "musdb", "additive": True}
    shards = [build_cache(refs, tmp_path / f"s{k}.h5", list(MUSDB_SOURCES), meta=meta, shard=Shard(k, 3)) for k in range(3)]
    assert [len(open_cache(s).tracks) for s in shards] == [2, 1, 1]
    merged = merge_caches(tmp_path / "merged.h5", list(reversed(shards)))
    single, joined = _datasets(toy_cache), _datasets(merged)
    assert single.keys() == joined.keys()
    assert all(single[k] == joined[k] for k in single)
    for role in ("mixture", "vocals"):
        for a, b in zip(open_cache(toy_cache).statistics(role), open_cache(merged).statistics(role)):
            np.testing.assert_array_equal(a, b)
    assert [t.name for t in open_cache(merged).tracks] == [t.name for t in open_cache(toy_cache).tracks]
    with pytest.raises(CacheError, match="shards lack 1 of 4 tracks"):
        merge_caches(tmp_path / "m2.h5", shards[:2])
    other = build_cache(refs, tmp_path / "o.h5", list(MUSDB_SOURCES), CacheOptions(dtype="float32"), meta=meta, shard=Shard(2, 3))
    with pytest.raises(CacheError, match="dtype is 'float32'"):
        merge_caches(tmp_path / "m3.h5", shards[:2] + [other])
    assert not (tmp_path / "m2.h5").exists() and not (tmp_path / "m3.h5").exists()


@pytest.mark.parametrize("spec", ["3/2", "0/0", "a/b", "1"])
def test_bad_shard_spec(run_cli, toy_root, tmp_path, spec):
    r = run_cli("cache", "musdb", toy_root, "--is-wav", "--split", "all", "-q", "--shard", spec, "-o", tmp_path / "x.h5")
    assert f"shard {spec!r}" in error_line(r)


def test_resume_after_kill_9(toy_root, toy_cache, tmp_path):
    out = tmp_path / "k.h5"
    cmd = [sys.executable, "-m", "umxtools", "cache", "musdb", str(toy_root), "--is-wav", "--split", "all", "-q", "-o", str(out)]
    parts = tmp_path / ".k.h5.parts"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(parts.glob("track-*.h5")):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the build finished before it could be killed"
    done = sorted(p.name for p in parts.glob("track-*.h5"))
    assert 1 <= len(done) < 4
    mtimes = {p: (parts / p).stat().st_mtime_ns for p in done}
    # resuming keeps the finished parts: watch that they are not rewritten
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rewritten = False
    while proc.poll() is None:
        for p, m in mtimes.items():
            try:
                rewritten |= (parts / p).stat().st_mtime_ns != m
            except FileNotFoundError:
                pass
        time.sleep(0.005)
    assert proc.returncode == 0, proc.stderr
    assert not rewritten and not parts.exists()
    single, resumed = _datasets(toy_cache), _datasets(out)
    assert single.keys() == resumed.keys() and all(single[k] == resumed[k] for k in single)
    np.testing.assert_array_equal(open_cache(out).statistics()[1], open_cache(toy_cache).statistics()[1])


def test_stale_cache_is_refused(run_cli, toy_copy, tmp_path):
    out = tmp_path / "c.h5"
    refs = musdb_tracks(toy_copy, is_wav=True, subsets="train", split=None)
    build_cache(refs, out, list(MUSDB_SOURCES), meta={"kind": "musdb", "additive": True})
    r = run_cli("cache", "check", out)
    # 4 tracks x 5 roles x (stft, wave, stats) + mean and std of 5 roles
    assert (r.code, r.out, r.err) == (0, f"{out}: 4 tracks, all 70 checksums match, statistics agree with the tracks, inputs unchanged\n", "")
    vocals = toy_copy / "train" / "toy_001" / "vocals.wav"
    data = _wav(vocals)
    sf.write(vocals, (data * 0.5).T, 44100, subtype="PCM_16")
    with pytest.raises(StaleCacheError, match="stale: input .*toy_001/vocals.wav changed"):
        open_cache(out)
    from umxtools.loaders import RandomDataset

    with pytest.raises(StaleCacheError):
        RandomDataset(out)
    assert RandomDataset(out, allow_stale=True)[0][0].shape == (2, 2049, 255)
    r = run_cli("cache", "check", out)
    assert error_line(r) == f"umxtools: error: {out}: 1 problem(s) found"
    assert "changed since the cache was built (stale)" in r.out


def test_corrupt_and_truncated_caches(run_cli, toy_cache, tmp_path):
    broken = tmp_path / "flipped.h5"
    broken.write_bytes(toy_cache.read_bytes())
    with h5py.File(broken, "r") as f:
        offset = f["tracks/00001/stft/drums"].id.get_chunk_info(0).byte_offset
    with open(broken, "r+b") as fh:
        fh.seek(offset + 1000)
        fh.write(b"\x55" * 64)
    r = run_cli("cache", "check", broken)
    error_line(r)
    assert "track 'toy_001' stft/drums: checksum mismatch" in r.out
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(toy_cache.read_bytes()[: toy_cache.stat().st_size // 2])
    for command in ("info", "check"):
        r = run_cli("cache", command, truncated)
        assert error_line(r) == f"umxtools: error: {truncated}: not a readable HDF5 file (truncated or corrupt)"
    notcache = tmp_path / "other.h5"
    with h5py.File(notcache, "w") as f:
        f["x"] = 1
    assert error_line(run_cli("cache", "info", notcache)).endswith("not a umxtools cache (no format attribute)")
    assert error_line(run_cli("cache", "info", tmp_path / "nope.h5")).endswith(
        "nope.h5: no such cache file (made by: umxtools cache musdb|folder|module SOURCE -o PATH)")


def test_settings_mismatch_is_named(toy_cache):
    with pytest.raises(CacheError, match="cache was built with n_fft=4096, but n_fft=2048 was asked for"):
        open_cache(toy_cache, expect=STFTSettings(n_fft=2048))
    open_cache(toy_cache, expect=STFTSettings())


def _damage(root: Path, case: str) -> Path:
    track = root / "train" / "toy_002"
    target = track / "bass.wav"
    if case == "missing_root":
        return root / "nowhere"
    if case == "missing_stem":
        target.unlink()
    elif case == "empty":
        target.write_bytes(b"")
    elif case == "garbage":
        target.write_bytes(b"RIFF" + bytes(200))
    elif case == "nan":
        data = _wav(target)
        data[0, 100] = np.inf
        sf.write(target, data.T, 44100, subtype="FLOAT")
    elif case == "lengths":
        sf.write(target, _wav(target)[:, :-500].T, 44100, subtype="FLOAT")
    elif case == "rate":
        import soxr

        sf.write(target, soxr.resample(_wav(target).T, 44100, 48000), 48000, subtype="FLOAT")
    return target


@pytest.mark.parametrize("case,message", [
    ("missing_root", "no such dataset folder"),
    ("missing_stem", "missing; every MUSDB18-HQ track folder holds mixture.wav, vocals.wav, drums.wav, bass.wav, other.wav"),
    ("empty", "empty file"),
    ("garbage", "not a readable audio file (Format not recognised.)"),
    ("nan", "contains NaN or infinite samples"),
    ("lengths", "track 'toy_002': stems have different lengths (mixture 352800, vocals 352800, drums 352800, bass 352300, other 352800 samples)"),
    ("rate", "sample rate 48000 Hz, expected 44100 Hz (pass --resample to convert)"),
])
def test_bad_input_gives_one_line_and_no_output(run_cli, toy_copy, tmp_path, case, message):
    bad = _damage(toy_copy, case)
    out = tmp_path / "bad.h5"
    r = run_cli("cache", "musdb", toy_copy if case != "missing_root" else bad, "--is-wav", "--split", "all", "-q", "-o", out)
    line = error_line(r)
    where = bad.parent if case == "lengths" else bad
    # toy_000 and toy_001 were built before toy_002 failed (a missing file is found before any work)
    kept = "" if case.startswith("missing") else (f"; the 2 finished track(s) are kept in {tmp_path / '.bad.h5.parts'}/ and the same "
                                                  "command resumes from them")
    assert line == f"umxtools: error: {where}: {message}{kept}"
    assert not out.exists()
    if case == "rate":
        r = run_cli("cache", "musdb", toy_copy, "--is-wav", "--split", "all", "-q", "--resample", "-o", out)
        assert r.code == 0 and "resampling" not in r.out


def test_folder_layouts(run_cli, toy_root, tmp_path):
    # trackfolder: the toy train split itself
    tf = tmp_path / "tf.h5"
    r = run_cli("cache", "folder", toy_root, "--split", "train", "--layout", "trackfolder", "--sources", "vocals,bass", "-q", "-o", tf)
    assert r.code == 0, r.err
    meta = open_cache(tf)
    assert meta.sources == ("vocals", "bass") and len(meta.tracks) == 4
    assert meta.tracks[0].roles == ("mixture", "vocals", "bass")
    # sourcefolder: SOURCE/*.wav
    src = tmp_path / "sources"
    for source in ("vocals", "drums"):
        (src / source).mkdir(parents=True)
        for t in ("toy_000", "toy_001", "toy_003"):
            (src / source / f"{t}.wav").symlink_to(toy_root / "train" / t / f"{source}.wav")
    sfc = tmp_path / "sf.h5"
    r = run_cli("cache", "folder", src, "--layout", "sourcefolder", "-q", "-o", sfc)
    assert r.code == 0, r.err
    meta = open_cache(sfc)
    assert meta.sources == ("drums", "vocals") and len(meta.tracks) == 6
    assert all(len(t.roles) == 1 for t in meta.tracks)
    from umxtools.loaders import RandomDataset

    # mixture statistics from mixes of the k-th file of every source (the STFT is linear)
    frames = []
    for t in ("toy_000", "toy_001", "toy_003"):
        wave = sum(torch.from_numpy(_wav(toy_root / "train" / t / f"{s}.wav")) for s in ("vocals", "drums"))
        spec = torch.stft(wave, 4096, 1024, window=torch.hann_window(4096), center=False, return_complex=True)
        frames.append(spec.abs().mean(0).T.double().numpy())
    frames = np.concatenate(frames)
    mean, std = open_cache(sfc).statistics("mixture")
    np.testing.assert_allclose(mean, frames.mean(0), rtol=2e-3, atol=1e-3)  # from float16-stored STFTs
    np.testing.assert_allclose(std, np.maximum(frames.std(0), 1e-4 * frames.std(0).max()), rtol=2e-3, atol=1e-3)
    ds = RandomDataset(sfc, "vocals", seq_dur=2.0, samples_per_track=2)
    assert {d.source for d in ds.draws(0)} == {"drums", "vocals"}
    assert ds[0][0].shape == (2, 2049, 83)
    # aligned: input/output pairs
    al = tmp_path / "al.h5"
    r = run_cli("cache", "folder", toy_root / "train", "--layout", "aligned", "--input-file", "mixture.wav",
                "--output-file", "vocals.wav", "-q", "-o", al)
    assert r.code == 0, r.err
    meta = open_cache(al)
    assert meta.sources == ("vocals",) and meta.tracks[0].roles == ("mixture", "vocals")
    r = run_cli("cache", "folder", toy_root / "train", "--layout", "aligned", "--output-file", "piano.wav", "-q", "-o", al, "--force")
    assert error_line(r).endswith("missing piano.wav (aligned layout needs mixture.wav and piano.wav)")


def test_parallel_build_equals_serial(toy_root, toy_cache, tmp_path):
    refs = musdb_tracks(toy_root, is_wav=True, subsets="train", split=None)
    out = build_cache(refs, tmp_path / "p.h5", list(MUSDB_SOURCES), meta={"kind": "musdb", "additive": True}, jobs=2)
    a, b = _datasets(toy_cache), _datasets(out)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_musdb_split_and_valid_tracks(toy_root):
    train = musdb_tracks(toy_root, is_wav=True, subsets="train", split="train", valid_tracks=["toy_003"])
    valid = musdb_tracks(toy_root, is_wav=True, subsets="train", split="valid", valid_tracks=["toy_003"])
    assert [r.name for r in train] == ["toy_000", "toy_001", "toy_002"] and [r.name for r in valid] == ["toy_003"]
    from umxtools.errors import DatasetError

    with pytest.raises(DatasetError, match="--split valid selects none of the 4 tracks: musdb's validation list"):
        musdb_tracks(toy_root, is_wav=True, subsets="train", split="valid")  # musdb's list names real tracks
    with pytest.raises(UsageError):
        Shard.parse("2/2")
