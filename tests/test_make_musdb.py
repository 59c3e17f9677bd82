"""The Makefile on MUSDB18-shaped roots: layout detection, musdb's split, and DATA left alone.

The rehearsal runs ``make data train eval`` as a user would on MUSDB18-HQ (``make -C`` the
repository, every output folder in tmp_path) over a corpus with MUSDB18's layout, musdb's own
validation names among 100 train tracks and 50 test tracks (tests/musdb_corpus.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLE, need_shared
from tests.musdb_corpus import musdb_validation_tracks, snapshot, write_musdb_corpus

# a tiny UMX for one epoch: the rehearsal checks the plumbing, not what the model learns
TINY = "--hidden-size 16 --seq-dur 0.5 --samples-per-track 1 --batch-size 16"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def make(*args: str, **variables: str | Path) -> subprocess.CompletedProcess:
    """``make -C REPO ARGS VAR=VALUE...`` with this interpreter and this checkout's package."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    assigned = [f"{k}={v}" for k, v in {"PYTHON": sys.executable, **variables}.items()]
    # its own session: on a timeout the whole tree (make, umxtools, their workers) is stopped
    proc = subprocess.Popen(["make", "--no-print-directory", "-C", str(REPO), *args, *assigned], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def outputs(tmp_path: Path) -> dict[str, Path]:
    return {"CACHE_DIR": tmp_path / "cache", "MODELS_DIR": tmp_path / "models", "EVAL_DIR": tmp_path / "eval"}


def cache_info(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "umxtools", "cache", "info", "--json", str(path)],
                         env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.fixture
def small_root(tmp_path) -> Path:
    """A MUSDB18-HQ root of 16 train tracks (musdb's 14 validation ones among them) and 1 test track."""
    root = tmp_path / "musdb18hq"
    write_musdb_corpus(root, train=16, test=1, seconds=1.0)
    return root


@pytest.mark.slow
def test_rehearsal_musdb18hq(tmp_path):
    root = tmp_path / "musdb18hq"
    train_names, test_names = write_musdb_corpus(root, train=100, test=50, seconds=1.0)
    before = snapshot(root)
    out = outputs(tmp_path)
    # one target and no oracle: training, separating and scoring 50 tracks are the slow stages
    # (the .stem.mp4 test runs an oracle; the toy pipeline all four targets)
    settings = {"EPOCHS": "1", "TRAIN_FLAGS": TINY, "TARGETS": "vocals", "ORACLES": ""}
    run = make("data", "train", "eval", DATA=root, **settings, **out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    valid = musdb_validation_tracks()
    train_cache = cache_info(out["CACHE_DIR"] / "musdb18hq-train.h5")
    valid_cache = cache_info(out["CACHE_DIR"] / "musdb18hq-valid.h5")
    assert (train_cache["tracks"], valid_cache["tracks"]) == (86, 14)
    assert train_cache["dataset"]["split"] == "train" and train_cache["dataset"]["is_wav"] is True
    assert valid_cache["dataset"]["valid_tracks"] is None  # musdb's own list, not a hand-kept one
    # open-unmix's defaults except what TRAIN_FLAGS changed
    vocals = json.loads((out["MODELS_DIR"] / "musdb18hq-umx" / "vocals.json").read_text())
    assert vocals["args"]["epochs"] == 1 and vocals["args"]["lr"] == 1e-3 and vocals["args"]["nb_layers"] == 3

    run_dir = out["EVAL_DIR"] / "musdb18hq"
    scored = sorted(p.stem for p in (run_dir / "scores" / "umx" / "test").glob("*.json"))
    assert scored == sorted(test_names)
    report = (run_dir / "report" / "report.md").read_text()
    # one target: separated with --residual, scored with it as accompaniment
    assert "| UMX | vocals | 50 |" in report and "| UMX | accompaniment | 50 |" in report
    assert report in run.stdout  # make eval prints the report
    assert set(valid) <= set(train_names)
    assert snapshot(root) == before  # nothing written, touched or removed inside DATA

    # a second run has nothing to do
    again = make("data", "train", "eval", DATA=root, **settings, **out)
    assert again.returncode == 0, again.stderr
    assert "umxtools" not in again.stdout.replace(report, "") and again.stderr == ""


def test_data_on_a_real_root_writes_nothing_in_it(small_root, tmp_path):
    before = snapshot(small_root)
    out = outputs(tmp_path)
    run = make("data", DATA=small_root, **out)
    assert run.returncode == 0, run.stderr
    assert "--is-wav" in run.stdout and "--valid-tracks" not in run.stdout and "umxtools toy" not in run.stdout
    assert cache_info(out["CACHE_DIR"] / "musdb18hq-valid.h5")["tracks"] == 14
    assert cache_info(out["CACHE_DIR"] / "musdb18hq-train.h5")["tracks"] == 2
    assert snapshot(small_root) == before

    # clean-data removes what make made for this root and nothing of the root
    clean = make("clean-data", DATA=small_root, **out)
    assert clean.returncode == 0, clean.stderr
    assert snapshot(small_root) == before
    assert sorted(p.name for p in out["CACHE_DIR"].iterdir()) == []


def test_toy_and_real_settings(small_root, tmp_path):
    """The toy gets its own tracks and a small UMX; a MUSDB18 root musdb's split and open-unmix's settings."""
    toy = make("-n", "data", "train", "eval", **outputs(tmp_path))
    assert toy.returncode == 0, toy.stderr
    assert "umxtools toy data/toy --tracks 8" in toy.stdout
    assert "--valid-tracks 'toy_006,toy_007'" in toy.stdout
    assert "--hidden-size 128 --seq-dur 2 --samples-per-track 16 --lr 3e-3 --epochs 10 " in toy.stdout
    assert "toy-train.h5" in toy.stdout and "toy-umx" in toy.stdout

    real = make("-n", "data", "train", "eval", DATA=small_root, **outputs(tmp_path))
    assert real.returncode == 0, real.stderr
    assert "umxtools toy" not in real.stdout and "--valid-tracks" not in real.stdout
    assert "--hidden-size" not in real.stdout and " --epochs 1000 " in real.stdout
    assert f"separate {small_root}/test " in real.stdout and "musdb18hq-umx" in real.stdout
    assert not (tmp_path / "cache").exists()  # -n: nothing run


def test_clean_data_never_deletes_a_dataset(small_root, tmp_path):
    before = snapshot(small_root)
    keep = tmp_path / "cache" / "mine.h5"  # another file in the cache folder is not make's
    keep.parent.mkdir()
    keep.write_bytes(b"x")
    run = make("clean-data", DATA=small_root, **outputs(tmp_path))
    assert run.returncode == 0, run.stderr
    assert snapshot(small_root) == before and keep.exists()


def test_not_a_dataset_is_one_line(tmp_path):
    empty = tmp_path / "nothing"
    (empty / "train").mkdir(parents=True)
    out = outputs(tmp_path)
    run = make("data", DATA=empty, **out)
    assert run.returncode != 0
    assert run.stderr.splitlines()[0] == (
        f"umxtools: error: {empty}: no MUSDB18 dataset "
        "(MUSDB18-HQ: train/<track>/mixture.wav; MUSDB18: train/<track>.stem.mp4)")
    assert not out["CACHE_DIR"].exists() and sorted(p.name for p in empty.rglob("*")) == ["train"]


def test_outputs_inside_the_dataset_are_refused(small_root, tmp_path):
    before = snapshot(small_root)
    run = make("data", DATA=small_root, CACHE_DIR=small_root / "cache", MODELS_DIR=tmp_path / "m", EVAL_DIR=tmp_path / "e")
    assert run.returncode != 0
    assert run.stderr.splitlines()[0] == (
        f"umxtools: error: {small_root / 'cache'}: inside the dataset {small_root}; outputs never go into DATA")
    assert snapshot(small_root) == before


@pytest.mark.slow
def test_musdb18_stems_through_the_pipeline(tmp_path):
    """A MUSDB18 (.stem.mp4) root: cached and scored through musdb without --is-wav, separated
    from the mixture stream. The shared real track stands in for every track."""
    sample = need_shared(SAMPLE / "stems" / "train" / "Music Delta - 80s Rock.stem.mp4")
    root = tmp_path / "musdb18"
    valid = musdb_validation_tracks()
    for subset, names in (("train", valid[:2] + ["Music Delta - 80s Rock"]), ("test", ["Al James - Schoolboy Facination"])):
        (root / subset).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(sample, root / subset / f"{name}.stem.mp4")
    before = snapshot(root)
    out = outputs(tmp_path)
    run = make("data", "train", "eval", DATA=root, EPOCHS="1", TRAIN_FLAGS=TINY, ORACLES="mix", TARGETS="vocals,other", **out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "--is-wav" not in run.stdout
    assert cache_info(out["CACHE_DIR"] / "musdb18-train.h5")["tracks"] == 1
    assert cache_info(out["CACHE_DIR"] / "musdb18-valid.h5")["tracks"] == 2
    scores = out["EVAL_DIR"] / "musdb18" / "scores" / "umx" / "test" / "Al James - Schoolboy Facination.json"
    assert scores.is_file()
    assert snapshot(root) == before
