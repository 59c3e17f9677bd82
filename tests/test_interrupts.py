"""SIGTERM and Ctrl-C: the track stages stop cleanly (one line, exit 143 or 130, no partial output)
and a rerun finishes the job. umxtools.interrupts, and oracle and eval through it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from tests.conftest import REPO
from umxtools import interrupts
from umxtools.evaluation import read_scores
from umxtools.interrupts import Interrupted, interruptible
from umxtools.toy import make_toy_dataset

STOPPED = "finished tracks are kept, a rerun continues"


# --- the helper ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_raises_interrupted_and_the_handlers_come_back(signum, code):
    before = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    cleaned = []
    with pytest.raises(Interrupted) as info:
        with interruptible():
            try:
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler runs before this ends
            finally:
                cleaned.append(True)
    assert cleaned == [True]
    assert (info.value.name, info.value.exit_code) == (signal.Signals(signum).name, code)
    assert str(info.value) == f"stopped by {signal.Signals(signum).name}; {STOPPED}"
    assert {s: signal.getsignal(s) for s in interrupts.SIGNALS} == before
    assert interrupts.received() is None


def test_a_swallowed_signal_is_raised_at_the_end_of_the_block():
    """Code that catches BaseException and goes on must not lose a SIGTERM."""
    with pytest.raises(Interrupted):
        with interruptible():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except BaseException:  # the careless code under test
                pass
            assert interrupts.received() is not None


def test_a_second_signal_does_not_interrupt_the_cleanup():
    finished = []
    with pytest.raises(Interrupted) as info:
        with interruptible():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGINT)  # Slurm's second signal, a second Ctrl-C
                time.sleep(0.05)
                finished.append(True)
    assert finished == [True] and info.value.name == "SIGTERM"


# --- oracle and eval in this process: the signal arrives in the middle of a track -----------------


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> Path:
    """A references folder of three 2 s tracks (copies of toy_001), read by soundfile."""
    toy = tmp_path_factory.mktemp("inttoy")
    make_toy_dataset(toy, tracks=1, seconds=2.0, seed=3, test_tracks=1)
    folder = tmp_path_factory.mktemp("intrefs")
    for name in ("a", "b", "c"):
        shutil.copytree(toy / "test" / "toy_001", folder / name)
    return folder


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial", ".lock")))


def test_oracle_stopped_mid_track_keeps_finished_tracks_and_a_rerun_finishes(refs, tmp_path, run_cli, monkeypatch):
    from umxtools import oracle

    out = tmp_path / "est"
    flags = ("oracle", "--references", refs, "--method", "irm2", "--targets", "vocals,accompaniment", "-o", out, "-q")
    real = oracle._write_estimate
    written = []

    def write_then_sigterm(path, *args):
        real(path, *args)
        written.append(path.name)
        if len(written) == 3:  # track b's first estimate is written, its second not yet
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

    monkeypatch.setattr(oracle, "_write_estimate", write_then_sigterm)
    result = run_cli(*flags)
    assert (result.code, result.out, result.err.splitlines()) == (143, "", [f"umxtools: stopped by SIGTERM; {STOPPED}"])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["a", oracle.MANIFEST]
    assert _leftovers(out) == []  # b's staging folder went with the signal
    assert oracle.track_problem(out / "a", "irm2", None, ["vocals", "accompaniment"]) is None

    monkeypatch.setattr(oracle, "_write_estimate", real)
    a_before = (out / "a" / "vocals.wav").stat().st_mtime_ns
    rerun = run_cli(*flags[:-1])
    assert rerun.code == 0, rerun.err
    assert rerun.err.splitlines()[-1] == "wrote 2 track(s), 1 already complete (--force redoes them)"
    assert (out / "a" / "vocals.wav").stat().st_mtime_ns == a_before  # skipped, not redone
    for name in ("a", "b", "c"):
        assert oracle.track_problem(out / name, "irm2", None, ["vocals", "accompaniment"]) is None


def _estimates(refs: Path, out: Path, names=("a", "b", "c")) -> Path:
    for name in names:
        (out / name).mkdir(parents=True)
        audio = {s: sf.read(refs / name / f"{s}.wav", always_2d=True)[0] for s in ("vocals", "drums", "bass", "other")}
        sf.write(out / name / "vocals.wav", 0.9 * audio["vocals"], 44100, subtype="FLOAT")
        sf.write(out / name / "accompaniment.wav", audio["drums"] + audio["bass"] + audio["other"], 44100, subtype="FLOAT")
    return out


def test_eval_stopped_mid_track_keeps_finished_scores_and_a_rerun_finishes(refs, tmp_path, run_cli, monkeypatch):
    from umxtools import evaluation

    est, scores = _estimates(refs, tmp_path / "est"), tmp_path / "scores"
    real = evaluation.score_track

    def score_then_sigint(references, track, *args):
        if track == "b":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
            time.sleep(5)
        return real(references, track, *args)

    monkeypatch.setattr(evaluation, "score_track", score_then_sigint)
    result = run_cli("eval", est, "--references", refs, "-o", scores, "-q")
    assert (result.code, result.out, result.err.splitlines()) == (130, "", [f"umxtools: stopped by SIGINT; {STOPPED}"])
    assert sorted(p.name for p in scores.glob("[!.]*.json")) == ["a.json"] and _leftovers(scores) == []

    monkeypatch.setattr(evaluation, "score_track", real)
    rerun = run_cli("eval", est, "--references", refs, "-o", scores)
    assert (rerun.code, rerun.out.strip()) == (0, str(scores))
    assert "scored 2 track(s)" in rerun.err and "1 already scored" in rerun.err


# --- eval --jobs 2 in a subprocess: the workers stop with the parent --------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has ended: only its parent has not reaped it


@pytest.mark.parametrize("how", ["sigterm-to-the-parent", "ctrl-c-to-the-group"])
def test_eval_with_workers_stops_them_and_exits_with_the_signal(refs, tmp_path, how):
    est, scores = _estimates(refs, tmp_path / "est"), tmp_path / "scores"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "umxtools", "eval", str(est), "--references", str(refs), "-o", str(scores),
                             "--jobs", "2", "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:  # the workers are scoring
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 2, proc.stderr.read() if proc.poll() is not None else "no workers"
        time.sleep(1)
        if how == "sigterm-to-the-parent":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    name, code = ("SIGTERM", 143) if how == "sigterm-to-the-parent" else ("SIGINT", 130)
    assert (proc.returncode, out, err.splitlines()) == (code, "", [f"umxtools: stopped by {name}; {STOPPED}"])
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [w for w in workers if _alive(w)] == []  # no worker scores on after the parent ended
    assert _leftovers(scores) == []
    for path in scores.glob("[!.]*.json"):  # whatever finished is whole
        assert read_scores(path)["umxtools"]["track"] == path.stem
