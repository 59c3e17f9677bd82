"""`umxtools cache` against the accidents of shared clusters: racing builds, outputs over inputs,
full and read-only disks, damaged or mixed caches that `cache check` must not pass, trackfolder
dying worker processes. Each test is the attack or accident it prevents."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from tests.conftest import error_line
from umxtools import cache as cache_module
from umxtools.cache import CacheOptions, build_cache, check_cache, merge_caches, open_cache
from umxtools.datasets import MUSDB_SOURCES, musdb_tracks
from umxtools.errors import CacheError
from umxtools.toy import make_toy_dataset

REPO = Path(__file__).resolve().parents[1]
META = {"kind": "musdb", "additive": True}


def _umx(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "umxtools", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_cache(toy_root, tmp_path_factory) -> Path:
    """The 2 test tracks of the toy dataset (toy_004, toy_005, 8 s)."""
    refs = musdb_tracks(toy_root, is_wav=True, subsets="test", split=None)
    return build_cache(refs, tmp_path_factory.mktemp("small") / "small.h5", list(MUSDB_SOURCES), meta=META)


@pytest.fixture
def damaged(small_cache, tmp_path) -> Path:
    """A private copy of ``small_cache`` to damage."""
    path = tmp_path / "damaged.h5"
    path.write_bytes(small_cache.read_bytes())
    return path


# --- racing writers ----------------------------------------------------------------------------


def test_a_second_build_of_the_same_output_fails_at_once_and_the_first_finishes(run_cli, toy_root, toy_cache, tmp_path):
    """A requeued Slurm job (another dataset, --force as bin/cache passes it) starts while the first still runs."""
    out = tmp_path / "train.h5"
    first = _umx("cache", "musdb", toy_root, "--is-wav", "--split", "all", "-q", "-o", out)
    lock = tmp_path / ".train.h5.lock"
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert lock.exists(), first.communicate()
    os.kill(first.pid, signal.SIGSTOP)  # holds its lock, however slow the second one starts
    try:
        start = time.time()
        second = _umx("cache", "musdb", toy_root, "--is-wav", "--subsets", "test", "--force", "-q", "-o", out)
        stdout, stderr = second.communicate(timeout=120)
        elapsed = time.time() - start
        pattern = (rf"umxtools: error: {re.escape(str(out))}: another umxtools process is writing it "
                   rf"\(pid {first.pid} on host .+\); wait for it to end or stop it")
        assert second.returncode == 1 and stdout == "" and re.fullmatch(pattern, stderr.strip()), stderr
        assert elapsed < 60  # no track was decoded: python start-up and the listing only
        # a merge into the same output waits its turn just the same
        r = run_cli("cache", "merge", out, toy_cache, "--force")
        assert re.fullmatch(pattern, error_line(r))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.communicate()
    report = check_cache(out)
    assert report.ok, report.problems
    assert [t.name for t in open_cache(out).tracks] == ["toy_000", "toy_001", "toy_002", "toy_003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.h5"]  # no lock, parts or temporaries left


def test_a_killed_builds_temporaries_are_removed_by_the_next(toy_root, tmp_path):
    """kill -9 during assembly left a hidden multi-GB temporary that kept the disk full."""
    out = tmp_path / "c.h5"
    dead = tmp_path / ".c.h5.999999-0badcafe.tmp"  # the name fileio.atomic gives it
    other = tmp_path / ".c.h5.x.h5.999999-0badcafe.tmp"  # another output's: not this build's business
    dead.write_bytes(b"x" * 1000)
    other.write_bytes(b"y")
    build_cache(musdb_tracks(toy_root, is_wav=True, subsets="test", split=None), out, list(MUSDB_SOURCES), meta=META)
    assert not dead.exists() and other.exists()


def test_a_parts_folder_with_foreign_files_is_never_emptied(run_cli, tiny_root, tmp_path):
    """A user kept notes in the hidden folder; a build of another dataset must not delete them."""
    parts = tmp_path / ".c.h5.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text('{"identity": "another build"}')
    (parts / "notes.txt").write_text("mine")
    r = run_cli("cache", "musdb", tiny_root, "--is-wav", "--split", "all", "-q", "-o", tmp_path / "c.h5")
    assert error_line(r) == f"umxtools: error: {parts}: holds notes.txt, which no cache build wrote; remove it yourself, then rerun"
    assert sorted(p.name for p in parts.iterdir()) == ["manifest.json", "notes.txt"]


def test_a_failed_build_names_its_parts_folder_and_the_rerun_says_what_it_reused(run_cli, tmp_path):
    """A failed build left a hidden .X.h5.parts/ folder its error did not mention, and the rerun
    that resumed from it said nothing about it."""
    toy_copy = tmp_path / "toy"
    make_toy_dataset(toy_copy, tracks=4, seconds=1.0, seed=2, test_tracks=0)
    bass = toy_copy / "train" / "toy_002" / "bass.wav"
    good = bass.read_bytes()
    bass.write_bytes(good[:100])  # cut short by a failed copy
    out = tmp_path / "c.h5"
    parts = tmp_path / ".c.h5.parts"
    args = ("cache", "musdb", toy_copy, "--is-wav", "--split", "all", "--no-waveforms", "-q", "-o", out)
    r = run_cli(*args)
    assert error_line(r).endswith(f"; the 2 finished track(s) are kept in {parts}/ and the same command resumes from them"), r.err
    assert sorted(p.name for p in parts.iterdir()) == ["manifest.json", "track-00000.h5", "track-00001.h5"]
    bass.write_bytes(good)
    vocals = toy_copy / "train" / "toy_000" / "vocals.wav"
    os.utime(vocals, ns=(vocals.stat().st_atime_ns, vocals.stat().st_mtime_ns + 10**9))  # re-exported meanwhile
    r = run_cli(*args)
    assert (r.code, r.out) == (0, f"{out}\n")
    assert r.err.splitlines() == [f"umxtools: note: {out}: 1 finished track(s) in {parts}/ have input files that changed since; "
                                  "rebuilding them",
                                  f"umxtools: note: {out}: resuming: 1 of 4 tracks already built in {parts}/"]
    assert check_cache(out).ok and not parts.exists()

    # other flags: the earlier build's parts are no use, and the rerun says it threw them away
    bass.write_bytes(good[:100])
    r = run_cli(*args, "--force")
    assert r.code == 1 and parts.is_dir()
    bass.write_bytes(good)
    r = run_cli(*args[:-2], "--dtype", "float32", "--force", "-q", "-o", out)
    assert (r.code, r.err) == (0, f"umxtools: note: {out}: {parts}/ held 2 finished track(s) of another build (other flags, tracks "
                                  "or dataset); discarded, building from scratch\n")


# --- inputs are never outputs ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["root", "track", "stem"])
def test_a_cache_is_never_written_into_its_dataset(run_cli, toy_copy, where):
    before = _tree(toy_copy)
    out = {"root": toy_copy / "train" / "c.h5", "track": toy_copy / "train" / "toy_001" / "c.h5",
           "stem": toy_copy / "train" / "toy_001" / "vocals.wav"}[where]
    r = run_cli("cache", "folder", toy_copy, "--split", "train", "--layout", "trackfolder", "--force", "-q", "-o", out)
    root = (toy_copy / "train").resolve()
    assert error_line(r) == f"umxtools: error: {out}: lies inside the dataset {root}; write the output somewhere else (-o)"
    r = run_cli("cache", "musdb", toy_copy, "--is-wav", "--split", "all", "--force", "-q", "-o", out)
    assert error_line(r) == f"umxtools: error: {out}: lies inside the dataset {toy_copy.resolve()}; write the output somewhere else (-o)"
    assert _tree(toy_copy) == before


def test_a_merge_never_writes_over_a_shard(run_cli, small_cache, tmp_path):
    shard = tmp_path / "s.h5"
    shard.write_bytes(small_cache.read_bytes())
    r = run_cli("cache", "merge", shard, shard, "--force")
    assert error_line(r) == f"umxtools: error: {shard}: is the shard {shard}; write the output somewhere else (-o)"
    assert shard.read_bytes() == small_cache.read_bytes()


# --- cache check -------------------------------------------------------------------------------


def _check(run_cli, path: Path):
    r = run_cli("cache", "check", path)
    return r, [line.removeprefix(f"{path}: ") for line in r.out.splitlines()]


def test_check_prints_a_verdict(run_cli, small_cache):
    r, lines = _check(run_cli, small_cache)
    # 2 tracks x 5 roles x (stft, wave, stats) + mean and std of 5 roles
    assert (r.code, lines, r.err) == (0, ["2 tracks, all 40 checksums match, statistics agree with the tracks, inputs unchanged"], "")


@pytest.mark.parametrize("target", ["tracks/00001/stats/vocals", "stats/mixture/std"])
def test_check_finds_damaged_statistics(run_cli, damaged, target):
    """Statistics had no checksum: a flipped value in them went through `cache check` and into every model."""
    with h5py.File(damaged, "r+") as f:
        data = f[target][()]
        data.flat[5] *= 1.5
        f[target][...] = data
    r, lines = _check(run_cli, damaged)
    assert error_line(r) == f"umxtools: error: {damaged}: 2 problem(s) found"
    if target.startswith("tracks"):
        assert lines == ["track 'toy_005' stats/vocals: checksum mismatch",
                         "/stats/vocals: not the statistics of the cache's tracks (damaged, or assembled from other tracks)"]
    else:
        assert lines == ["/stats/mixture/std: checksum mismatch",
                         "/stats/mixture: not the statistics of the cache's tracks (damaged, or assembled from other tracks)"]


def test_check_notes_statistics_without_checksums_of_older_caches(run_cli, damaged):
    with h5py.File(damaged, "r+") as f:
        f.visititems(lambda name, obj: obj.attrs.__delitem__("crc32") if "stats" in name and isinstance(obj, h5py.Dataset) else None)
    r, lines = _check(run_cli, damaged)
    assert (r.code, r.err) == (0, "")
    assert lines == [("note: 20 statistics datasets have no checksum (built by umxtools before they had one); "
                      "they were compared with the tracks' moments instead"),
                     "2 tracks, all 20 checksums match, statistics agree with the tracks, inputs unchanged"]


@pytest.mark.parametrize("command", ["check", "info", "train"])
@pytest.mark.parametrize("where,key,kind,label", [
    ("tracks/00001", "inputs", "list", " of track 00001"),
    ("tracks/00000", "roles", "list", " of track 00000"),
    ("/", "sources", "list", ""),
    ("/", "dataset", "dict", ""),
])
def test_damaged_json_attributes_are_one_line(run_cli, damaged, tmp_path, command, where, key, kind, label):
    """A damaged `inputs` attribute made `cache check` print a JSONDecodeError traceback."""
    with h5py.File(damaged, "r+") as f:
        f[where].attrs[key] = '[{"path": "/data/x.wav", '  # cut short
    args = {"check": ["cache", "check", damaged], "info": ["cache", "info", damaged, "--json"],
            "train": ["train", damaged, "--valid", damaged, "--target", "vocals", "-q", "-o", tmp_path / "m"]}[command]
    r = run_cli(*args)
    if command == "info" and key == "inputs":
        assert r.code == 0, r.err  # info reads no provenance
        return
    assert error_line(r) == f"umxtools: error: {damaged}: attribute {key!r}{label} is not a JSON {kind}; the cache is damaged: rebuild it"


@pytest.mark.parametrize("intruder", ["float32", "other dataset"])
def test_check_finds_tracks_of_another_build(run_cli, damaged, toy_root, toy_cache, tmp_path, intruder):
    """Two builds raced to one output: a float32 track under a float16 root, or a track of another dataset."""
    if intruder == "float32":
        refs = musdb_tracks(toy_root, is_wav=True, subsets="test", split=None)
        source = build_cache(refs, tmp_path / "f32.h5", list(MUSDB_SOURCES), CacheOptions(dtype="float32"), meta=META)
    else:
        source = toy_cache  # the train tracks: toy_001 is track 1 there too
    with h5py.File(damaged, "r+") as f, h5py.File(source, "r") as src:
        del f["tracks/00001"]
        src.copy(src["tracks/00001"], f["tracks"], name="00001")
    r, lines = _check(run_cli, damaged)
    error_line(r)
    mismatch = [f"/stats/{role}: not the statistics of the cache's tracks (damaged, or assembled from other tracks)"
                for role in ("bass", "drums", "mixture", "other", "vocals")]
    if intruder == "float32":
        name = "toy_005"
        # the same track: its moments come from the float32 STFT in either build, the statistics agree
        assert lines == [f"track {name!r}: stft/{role} is float32, but the cache's dtype is float16"
                         for role in ("mixture", "vocals", "drums", "bass", "other")]
        # and a merge refuses to take such a track in
        with pytest.raises(CacheError, match=r"tracks/00001: stft/mixture is float32, but the cache's dtype is float16; "
                                             r"it does not belong in this cache \(rebuild\)"):
            merge_caches(tmp_path / "m.h5", [damaged])
        assert not (tmp_path / "m.h5").exists()
    else:
        assert lines == mismatch


def test_check_finds_a_missing_or_doubled_track(run_cli, damaged):
    with h5py.File(damaged, "r+") as f:
        f.copy(f["tracks/00000"], f["tracks"], name="00007")
    r, lines = _check(run_cli, damaged)
    error_line(r)
    assert lines[:3] == ["group /tracks/00007 holds track index 0", "holds 3 tracks, its nb_tracks attribute says 2",
                         "track indices are not those of shard 0/1 of 2 tracks (a track appears twice)"]
    assert len(lines) == 3 + 5  # and the statistics count its frames once, not twice


# --- full, read-only and missing output locations ----------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """``mount(size)``: a fresh tmpfs of ``size`` under tmp_path (needs root; skips otherwise)."""
    mounts = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"fs{len(mounts)}"
        folder.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}); the test needs root")
        mounts.append(folder)
        return folder

    yield mount
    for folder in reversed(mounts):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """2 train tracks of 1 s: about 5 MB of parts each, and as much again for the cache."""
    root = tmp_path_factory.mktemp("tiny")
    make_toy_dataset(root, tracks=2, seconds=1.0, seed=1, test_tracks=0)
    return root


@pytest.mark.parametrize("size,jobs", [("3m", 1), ("14m", 2)])
def test_a_full_disk_is_one_line_and_leaves_no_temporaries(tiny_root, small_fs, size, jobs):
    """A disk-full build printed ~170 lines of HDF5 tracebacks, segfaulted, and left a hidden temporary
    file that kept the disk full. 3m: the first part does not fit; 14m: the parts fit, the cache does not."""
    fs = small_fs(size)
    out = fs / "c.h5"
    build = _umx("cache", "musdb", tiny_root, "--is-wav", "--split", "all", "-q", "-j", jobs, "-o", out)
    stdout, stderr = build.communicate(timeout=300)
    # the finished tracks wait in a hidden folder: the error names it (none finished: no folder)
    kept = f"; the 2 finished track(s) are kept in {fs / '.c.h5.parts'}/ and the same command resumes from them" if size == "14m" else ""
    assert (build.returncode, stdout, stderr) == (1, "", f"umxtools: error: {out}: no space left on device{kept}\n")
    left = sorted(str(p.relative_to(fs)) for p in fs.rglob("*"))
    assert not [p for p in left if p.endswith((".tmp", ".lock")) or p == "c.h5"], left
    if size == "14m":
        assert left == [".c.h5.parts", ".c.h5.parts/manifest.json", ".c.h5.parts/track-00000.h5", ".c.h5.parts/track-00001.h5"]
    else:
        assert left == []
    # space freed: the same command resumes from the parts and finishes
    subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)
    build = _umx("cache", "musdb", tiny_root, "--is-wav", "--split", "all", "-q", "-j", jobs, "-o", out)
    stdout, stderr = build.communicate(timeout=300)
    resumed = f"umxtools: note: {out}: resuming: 2 of 2 tracks already built in {fs / '.c.h5.parts'}/\n" if size == "14m" else ""
    assert (build.returncode, stderr) == (0, resumed), stderr
    assert check_cache(out).ok and sorted(p.name for p in fs.iterdir()) == ["c.h5"]


def test_a_read_only_output_folder_is_refused_before_any_work(run_cli, tiny_root, small_fs):
    fs = small_fs("1m")
    if subprocess.run(["mount", "-o", "remount,ro", str(fs)], capture_output=True).returncode:
        pytest.skip("cannot remount the tmpfs read-only here")
    r = run_cli("cache", "musdb", tiny_root, "--is-wav", "--split", "all", "-q", "-o", fs / "c.h5")
    assert error_line(r) == f"umxtools: error: {fs}: read-only file system"
    r = run_cli("cache", "merge", fs / "m.h5", tiny_root / "nothing.h5")
    assert error_line(r) == f"umxtools: error: {fs}: read-only file system"


def test_an_output_below_a_file_is_one_line(run_cli, tiny_root, tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    r = run_cli("cache", "musdb", tiny_root, "--is-wav", "--split", "all", "-q", "-o", blocker / "c.h5")
    assert error_line(r) == f"umxtools: error: {blocker}: file exists"  # where the output folder should be
    assert blocker.read_text() == "not a folder"


# --- failures in decoding ----------------------------------------------------------------------


def test_an_unexpected_decoding_failure_is_one_line(run_cli, tiny_root, tmp_path, monkeypatch):
    def broken(ref, index, options):
        raise RuntimeError("cuFFT internal error\nsecond line")

    monkeypatch.setattr(cache_module, "encode_track", broken)
    out = tmp_path / "c.h5"
    r = run_cli("cache", "musdb", tiny_root, "--is-wav", "--split", "all", "-q", "-o", out)
    first = tiny_root / "train" / "toy_000" / "mixture.wav"
    assert error_line(r) == f"umxtools: error: {first}: encoding track 'toy_000' failed (RuntimeError: cuFFT internal error)"
    # no track finished: nothing to resume, so no hidden parts folder either; no lock, no temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == []


DYING = '''
import os
import signal

import numpy as np


class Dying:
    """A dataset whose items kill the process reading them (as the kernel's OOM killer would)."""

    sample_rate = 44100
    sources = ["vocals"]

    def __len__(self):
        return 3

    def __getitem__(self, index):
        os.kill(os.getpid(), signal.SIGKILL)
        return {"vocals": np.zeros((2, 44100), np.float32)}
'''


def test_a_dead_decode_worker_is_one_line(tmp_path):
    module = tmp_path / "dying.py"
    module.write_text(DYING)
    out = tmp_path / "out" / "c.h5"
    build = _umx("cache", "module", f"{module}:Dying", "-j", "2", "-q", "-o", out)
    stdout, stderr = build.communicate(timeout=300)
    assert (build.returncode, stdout) == (1, "")
    assert stderr == (f"umxtools: error: {module}:Dying[0]: the decode process of track 'Dying-00000' died (out of memory?); "
                      "rerun with fewer --jobs\n")
    assert not out.exists() and not (out.parent / ".c.h5.lock").exists()
