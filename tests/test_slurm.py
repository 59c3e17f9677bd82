"""The bin/ scripts on a real local Slurm (bin/slurm-local): arrays, dependencies, merges.

Skipped, with the reason, only where Slurm is not installed and cannot be started here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import h5py
import pytest

from tests.conftest import REPO

BIN = REPO / "bin"


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed (make slurm installs it through apt: slurm-wlm, munge)")
    if subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        started = subprocess.run([str(BIN / "slurm-local"), "start"], capture_output=True, text=True)
        if started.returncode != 0:
            pytest.skip(f"the local Slurm cluster did not start: {started.stderr.strip()[-300:]}")
    return True


def _env(tmp_path: Path) -> dict:
    # jobs run the same umxtools as the tests, from this checkout; one thread everywhere, so that
    # single-process and array runs sum floats in the same order and agree to the byte
    return {**os.environ, "UMX_BIN": str(BIN), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _sbatch(args: list[str], cwd: Path, env: dict) -> str:
    r = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _datasets(path: Path) -> dict[str, bytes]:
    out = {}
    with h5py.File(path, "r") as f:
        f["tracks"].visititems(lambda name, obj: out.__setitem__(name, obj[()].tobytes()) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_cache_array_and_merge_equal_the_single_build(slurm, toy_root, toy_cache, tmp_path):
    env = _env(tmp_path)
    (tmp_path / "logs").mkdir()
    out = tmp_path / "train.h5"
    array = _sbatch(["--array=0-2", str(BIN / "cache.sbatch"), str(out), "musdb", str(toy_root), "--is-wav", "--split", "all"],
                    tmp_path, env)
    _sbatch(["--wait", f"--dependency=afterok:{array}", str(BIN / "merge.sbatch"), str(out), "3"], tmp_path, env)
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))
    assert out.exists(), logs
    assert not list(tmp_path.glob("train.shard-*")), "the merge removes its shards"
    single, merged = _datasets(toy_cache), _datasets(out)
    assert single.keys() == merged.keys() and all(single[k] == merged[k] for k in single)


def test_shard_scripts_outside_slurm(toy_root, tmp_path):
    env = {**_env(tmp_path), "SHARD": "3/2"}
    r = subprocess.run([str(BIN / "cache"), str(tmp_path / "x.h5"), "musdb", str(toy_root), "--is-wav", "--split", "all"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == ["umxtools: error: shard '3/2': need 0 <= K < N"]
    r = subprocess.run([str(BIN / "merge-cache"), str(tmp_path / "x.h5"), "2"], capture_output=True, text=True, env=env)
    shard0 = tmp_path / "x.shard-0-of-2.h5"
    assert r.returncode == 1 and r.stderr.startswith(f"umxtools: error: {shard0}: missing shard 0/2")


def _run(cmd: list[str], env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _tree(folder: Path, pattern: str) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob(pattern))}


def test_separate_and_eval_arrays_equal_single_process(slurm, toy_root, tmp_path):
    from tests.conftest import COMPAT, need_shared

    model = need_shared(COMPAT / "model")
    env = _env(tmp_path)
    (tmp_path / "logs").mkdir()
    test = toy_root / "test"
    # museval's estimates layout: ESTIMATES/<subset>/<track>/<target>.wav
    _run([str(BIN / "separate"), str(tmp_path / "single" / "test"), str(model), str(test)], env)
    job = _sbatch(["--wait", "--array=0-1", str(BIN / "step.sbatch"), "separate", str(tmp_path / "array" / "test"), str(model),
                   str(test)], tmp_path, env)
    assert job
    import soundfile as sf

    single, array = _tree(tmp_path / "single", "*.wav"), _tree(tmp_path / "array", "*.wav")
    assert len(single) == 8 and single.keys() == array.keys()  # 2 tracks x 4 targets
    for name in single:  # the same samples (float WAV headers carry libsndfile's write time)
        a, b = sf.read(tmp_path / "single" / name)[0], sf.read(tmp_path / "array" / name)[0]
        assert a.shape == b.shape and (a == b).all(), name
    scores = ["--musdb", str(toy_root), "--is-wav", "--targets", "vocals,drums,bass,other"]
    _run([str(BIN / "eval"), str(tmp_path / "s-single"), str(tmp_path / "single"), *scores], env)
    _sbatch(["--wait", "--array=0-1", str(BIN / "step.sbatch"), "eval", str(tmp_path / "s-array"), str(tmp_path / "array"), *scores],
            tmp_path, env)
    import json

    # the score files (test/<track>.json), not eval's marker (.umxtools.json) beside them
    a = {k: json.loads(v)["targets"] for k, v in _tree(tmp_path / "s-single" / "test", "*.json").items()}
    b = {k: json.loads(v)["targets"] for k, v in _tree(tmp_path / "s-array" / "test", "*.json").items()}
    assert len(a) == 2 and a == b


def test_two_process_training_through_srun_and_torchrun(slurm, toy_root, toy_cache, tmp_path):
    from umxtools.cache import build_cache
    from umxtools.datasets import MUSDB_SOURCES, musdb_tracks

    valid = build_cache(musdb_tracks(toy_root, is_wav=True, subsets="test", split=None), tmp_path / "valid.h5",
                        list(MUSDB_SOURCES), meta={"kind": "musdb", "additive": True})
    env = {**_env(tmp_path), "NPROC": "2", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "model"
    r = _run(["srun", "-N1", "-n1", "--export=ALL", str(BIN / "train"), str(toy_cache), str(valid), str(out), "--target", "vocals",
              "--hidden-size", "16", "--nb-layers", "1", "--seq-dur", "1", "--samples-per-track", "2", "--batch-size", "4",
              "--epochs", "1", "-q"], env, cwd=tmp_path)
    assert sorted(p.name for p in out.glob("*.chkpnt")) == ["vocals.chkpnt"]
    assert (out / "vocals.pth").exists() and (out / "separator.json").exists()
    assert r.stdout.strip().splitlines()[-1] == str(out)


def _readme_cluster_block() -> str:
    """The first ``sh`` block of the README's cluster section, as a reader would paste it."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## On a cluster (Slurm)"):]
    section = section[:section.index("\n## ")]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


def test_readme_cluster_block_runs_as_written(slurm, tmp_path):
    """The README's block, verbatim, from a folder where bin/ is the repository's: a one-node
    cluster, toy data, then bin/pipeline with WAIT=1 through every job to the report."""
    import json
    import sys

    block = _readme_cluster_block()
    assert "bin/pipeline data/toy runs/toy" in block and "WAIT=1" in block
    (tmp_path / "bin").symlink_to(BIN)
    # the umxtools command of this Python (console script), importing this checkout
    env = {**_env(tmp_path), "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    work = tmp_path / "runs" / "toy"
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((work / "logs").glob("*.out")))
    assert r.returncode == 0, f"{r.stderr[-3000:]}\n{logs}"
    ids = dict(line.split() for line in r.stdout.splitlines()
               if len(line.split()) == 2 and line.split()[1].isdigit())
    assert list(ids) == ["cache-train", "cache-valid", "merge-train", "train", "separate", "eval", "report"]
    assert r.stderr.strip().splitlines()[-1] == f"report: {work / 'report' / 'report.md'}"
    report = (work / "report" / "report.md").read_text()
    assert report.strip() in r.stdout  # the block's last line printed it
    # every stage left its artifact: merged caches (shards removed), the joint model, the
    # estimates and the scores of both test tracks
    assert sorted(p.name for p in (work / "cache").iterdir()) == ["train.h5", "valid.h5"]
    assert (work / "models" / "umx" / "separator.json").exists()
    tracks = sorted(p.name for p in (tmp_path / "data" / "toy" / "test").iterdir())
    assert len(tracks) == 2
    assert sorted(p.name for p in (work / "estimates" / "umx" / "test").iterdir()) == tracks
    for track in tracks:
        doc = json.loads((work / "scores" / "umx" / "test" / f"{track}.json").read_text())
        assert doc["umxtools"]["backend"] == "fast"
        assert [t["name"] for t in doc["targets"]] == ["vocals", "drums", "bass", "other"]
    assert "UMX" in report and "vocals" in report


def test_steps_run_before_their_inputs_exist(toy_root, tmp_path):
    """One line naming the missing file and the step that makes it, exit 1, nothing written."""
    env = _env(tmp_path)
    nodata, cache, model, est, scores = (tmp_path / n for n in ("nodata", "train.h5", "models/umx", "est", "scores"))
    (tmp_path / "empty-model").mkdir()
    cases = [
        ([BIN / "cache", tmp_path / "c.h5", "musdb", nodata, "--is-wav"],
         f"{nodata}: no such dataset (MUSDB18 or your stems; a toy one is made by: umxtools toy {nodata})"),
        ([BIN / "train", cache, cache, tmp_path / "m"],
         f"{cache}: no such cache (made by: bin/cache {cache} musdb ROOT ... or make data)"),
        ([BIN / "separate", est, model, toy_root / "test"],
         f"{model}: no such model folder (made by: bin/train CACHE VALID_CACHE {model} ...)"),
        ([BIN / "separate", est, tmp_path / "empty-model", tmp_path / "mix.wav"],
         f"{tmp_path / 'mix.wav'}: no such input (a mixture file or a folder of track folders; toy data is made by: "
         "umxtools toy ROOT)"),
        ([BIN / "eval", scores, est, "--musdb", toy_root, "--is-wav"],
         f"{est}: no estimates folder (made by: bin/separate {est} MODEL INPUT...)"),
        ([BIN / "report", tmp_path / "report", f"UMX={scores}", "--agg", "mean"],
         f"{scores}: no scores folder (made by: bin/eval {scores} ESTIMATES --musdb ROOT ...)"),
        ([BIN / "pipeline", nodata, tmp_path / "work"],
         f"{nodata}: no MUSDB18-HQ dataset (train/ and test/ track folders; a toy one is made by: umxtools toy {nodata})"),
    ]
    for cmd, message in cases:
        r = subprocess.run([str(part) for part in cmd], capture_output=True, text=True, env=env, timeout=120)
        assert (r.returncode, r.stderr.strip().splitlines()) == (1, [f"umxtools: error: {message}"]), cmd
        assert r.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-model"]


def _squeue(job: str, *flags: str) -> list[str]:
    r = subprocess.run(["squeue", "-h", "-j", job, *flags], capture_output=True, text=True, timeout=30)
    return r.stdout.split()


def test_a_requeued_eval_array_task_finishes_the_job(slurm, toy_root, tmp_path):
    """`scontrol requeue` of an eval task that has scored part of its tracks: SIGTERM stops it
    cleanly (its log says so), the requeued task scores the rest, and the scores equal a single
    process's. Estimates: oracle irm2 of four 8 s tracks, written by an oracle array."""
    import json

    env = _env(tmp_path)
    (tmp_path / "logs").mkdir()
    refs = tmp_path / "refs"
    for i, name in enumerate(("a", "b", "c", "d")):
        shutil.copytree(toy_root / "test" / sorted(p.name for p in (toy_root / "test").iterdir())[i % 2], refs / name)
    est = tmp_path / "est"
    oracle = _sbatch(["--wait", "--array=0-1", str(BIN / "step.sbatch"), "oracle", str(est), "--references", str(refs),
                      "--method", "irm2", "--targets", "vocals,accompaniment"], tmp_path, env)
    assert oracle and sorted(p.name for p in est.iterdir() if not p.name.startswith(".")) == ["a", "b", "c", "d", "umxtools-oracle.json"]
    flags = ["--references", str(refs), "--targets", "vocals,accompaniment"]
    _run([str(BIN / "eval"), str(tmp_path / "s-single"), str(est), *flags], env)

    scores = tmp_path / "s-array"
    job = _sbatch(["--array=0-1", "--open-mode=append", str(BIN / "step.sbatch"), "eval", str(scores), str(est), *flags], tmp_path, env)
    deadline = time.monotonic() + 300
    requeued = []
    while not requeued and time.monotonic() < deadline:
        done = list(scores.glob("[!.]*.json"))
        running = _squeue(job, "-t", "R", "-o", "%i")
        if len(done) == 1 and running:  # one task has scored its first track and is at its second
            for task in running:
                subprocess.run(["scontrol", "requeue", task], check=True, capture_output=True, timeout=30)
            requeued = running
        time.sleep(0.1)
    assert requeued, "no task was caught between its two tracks"
    _start_now_once_pending(requeued)
    while _squeue(job) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _squeue(job), "the requeued job did not finish"
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("umx-step-*.out"))
    assert "umxtools: stopped by SIGTERM; finished tracks are kept, a rerun continues" in logs, logs
    a = {k: json.loads(v)["targets"] for k, v in _tree(tmp_path / "s-single", "[!.]*.json").items()}
    b = {k: json.loads(v)["targets"] for k, v in _tree(scores, "[!.]*.json").items()}
    assert len(a) == 4 and a == b
    assert not [p for p in scores.rglob(".*") if p.name.endswith((".tmp", ".lock"))]


def _start_now_once_pending(tasks: list[str]) -> None:
    """A requeued job waits about two minutes before it may start again (Slurm's begin time):
    once each task is pending again, let it start now (the test is about the rerun, not the wait)."""
    for task in tasks:
        deadline = time.monotonic() + 180  # a loaded machine (the other test worker) takes its time over the requeue
        while (state := _job_state(task)) != "PENDING":
            # not pending yet: a job that ends its requeue later would be taken by a dependency as done
            assert time.monotonic() < deadline, f"{task} is not pending again after its requeue ({state})"
            time.sleep(0.1)
        subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=False, capture_output=True, timeout=60)


def _job_state(job: str) -> str:
    r = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    return next((w.split("=", 1)[1] for w in r.stdout.split() if w.startswith("JobState=")), "gone")


def test_separate_array_task_requeued_mid_track_finishes_the_job(slurm, toy_root, tmp_path):
    """`scontrol requeue` (what preemption does) while a task writes a track: Slurm sends SIGTERM,
    then runs the task again from the start. The rerun used to fail (`exists; pass --force`) and
    the killed run's partial folder stayed, so --kill-on-invalid-dep cancelled eval and report."""
    import soundfile as sf

    from tests.test_separate import write_umx_folder

    model = write_umx_folder(tmp_path / "model", hidden=8)
    env = _env(tmp_path)
    (tmp_path / "logs").mkdir()
    test = toy_root / "test"
    _run([str(BIN / "separate"), str(tmp_path / "single"), str(model), str(test)], env)
    out = tmp_path / "array"
    job = _sbatch(["--array=0-0", "--open-mode=append", str(BIN / "step.sbatch"), "separate", str(out), str(model), str(test)],
                  tmp_path, env)
    task = f"{job}_0"
    deadline = time.monotonic() + 300
    while not (out.exists() and list(out.glob(".*.partial"))):  # the task is writing its first track
        assert _job_state(task) in ("PENDING", "RUNNING", "CONFIGURING"), _job_state(task)
        assert time.monotonic() < deadline, "the task did not start a track"
        time.sleep(0.01)
    subprocess.run(["scontrol", "requeue", task], check=True, timeout=60)
    _start_now_once_pending([task])
    waited = subprocess.run(["sbatch", "--wait", "--quiet", "--kill-on-invalid-dep=yes", f"--dependency=afterok:{job}",
                             "--output=/dev/null", "--wrap", "true"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    log = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))
    assert waited.returncode == 0, f"the job did not complete after its requeue\n{log}"
    assert "umxtools: stopped by SIGTERM; finished tracks are kept, a rerun continues" in log, log
    tracks = sorted(p.name for p in test.iterdir())
    assert sorted(p.name for p in out.iterdir()) == tracks  # nothing hidden left: no partial, no lock
    single, array = _tree(tmp_path / "single", "*.wav"), _tree(out, "*.wav")
    assert len(single) == 8 and single.keys() == array.keys()
    for name in single:  # the same samples as an uninterrupted run
        a, b = sf.read(tmp_path / "single" / name)[0], sf.read(out / name)[0]
        assert a.shape == b.shape and (a == b).all(), name
