"""`umxtools separate` run again after it was stopped: a requeued, preempted or killed Slurm task.

The accidents: a rerun over finished tracks exited 1 (``exists; pass --force``); ``kill -9`` and
SIGTERM left ``OUT/.<track>.<pid>-<hex>.partial`` folders that no rerun removed. Here a real
process is stopped while it writes a track, then the same command runs again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import REPO, error_line
from tests.test_separate import music, write_umx_folder
from umxtools import fileio

NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_umx_folder(tmp_path_factory.mktemp("model") / "umx", hidden=8)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("songs")
    paths = []
    for i, name in enumerate(NAMES):
        paths.append(folder / f"{name}.wav")
        sf.write(paths[-1], music(4.0, seed=i).T, 44100, subtype="FLOAT")
    return paths


@pytest.fixture(scope="module")
def reference(model, inputs, tmp_path_factory) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    r = subprocess.run(_command(model, inputs, out), capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    return out


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _command(model: Path, inputs: list[Path], out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "umxtools", "separate", *map(str, inputs), "--model", str(model), "-o", str(out),
            "--device", "cpu", *flags]


def _partials(out: Path) -> list[Path]:
    return sorted(out.glob(".*.partial")) if out.exists() else []


def _start_and_stop(cmd: list[str], out: Path, signum: int, whole_group: bool) -> subprocess.CompletedProcess:
    """Start ``cmd``, wait until it writes a track (a partial folder exists), send ``signum`` to it
    (``whole_group``: to every process of its group, as Slurm signals a job), wait for its end."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    deadline = time.monotonic() + 300
    while not _partials(out):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no track was started"
        time.sleep(0.005)
    if whole_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _same_stems(out: Path, reference: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)  # no partial, no .old, no lock left
    for name in NAMES:
        want = sorted(p.name for p in (reference / name).iterdir())
        assert sorted(p.name for p in (out / name).iterdir()) == want
        for stem in want:
            if stem.endswith(".wav"):
                np.testing.assert_array_equal(sf.read(out / name / stem)[0], sf.read(reference / name / stem)[0])


@pytest.mark.parametrize(("jobs", "signum", "whole_group"), [
    ("1", signal.SIGTERM, False),   # Slurm's preemption, time limit, scontrol requeue
    ("1", signal.SIGINT, False),    # Ctrl-C
    ("2", signal.SIGTERM, True),    # Slurm signals every process of the job, workers included
    ("2", signal.SIGTERM, False),   # kill PID of the parent alone: it stops its workers
])
def test_a_stopped_run_leaves_no_partial_and_a_rerun_finishes_it(model, inputs, reference, tmp_path, jobs, signum, whole_group):
    out = tmp_path / "out"
    cmd = _command(model, inputs, out, "--jobs", jobs)
    r = _start_and_stop(cmd, out, signum, whole_group)
    name = signal.Signals(signum).name
    assert (r.returncode, r.stderr) == (128 + signum, f"umxtools: stopped by {name}; finished tracks are kept, a rerun continues\n")
    done = sorted(p.name for p in out.iterdir())
    assert set(done) < set(NAMES)  # only finished tracks: no partial folder, no lock file
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"separated {len(NAMES) - len(done)}, skipped {len(done)} already done\n"
    assert r.stdout.split() == [str(out / n) for n in NAMES]
    _same_stems(out, reference)


def test_what_kill_9_leaves_is_removed_by_the_rerun(model, inputs, reference, tmp_path):
    out = tmp_path / "out"
    cmd = _command(model, inputs, out)
    r = _start_and_stop(cmd, out, signal.SIGKILL, False)
    assert r.returncode == -signal.SIGKILL
    assert _partials(out) and list(out.glob(".*.lock"))  # what a killed writer leaves
    # a replacement cut short between its two renames leaves the earlier separation as .old
    old = fileio.temp_path(out / "c", ".old")
    old.mkdir()
    (old / "separation.json").write_text("{}")
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    _same_stems(out, reference)


def test_a_live_writer_keeps_its_partial(run_cli, model, inputs, tmp_path):
    """Only the holder of a track's lock removes that track's temporaries: a second run on the
    same track (an array submitted twice) gets an error for it and leaves the writer alone."""
    out = tmp_path / "out"
    out.mkdir()
    writing = fileio.temp_path(out / "a", ".partial")
    with fileio.exclusive(out / "a"):  # another writer of track a, alive
        writing.mkdir()
        (writing / "vocals.wav").write_bytes(b"being written")
        r = run_cli("separate", inputs[0], inputs[1], "--model", model, "-o", out, "--niter", "0")
        assert r.out.split() == [str(out / "b")]
        assert error_line(r) == (f"umxtools: error: {out / 'a'}: another umxtools process is writing it "
                                 f"(pid {os.getpid()} on host {os.uname().nodename}); wait for it to end or stop it")
        assert (writing / "vocals.wav").read_bytes() == b"being written"
    # the writer is gone (its lock with it): what it left is garbage to the next run
    r = run_cli("separate", inputs[0], inputs[1], "--model", model, "-o", out, "--niter", "0")
    assert r.code == 0 and r.err.splitlines() == ["separated 1, skipped 1 already done"]
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
