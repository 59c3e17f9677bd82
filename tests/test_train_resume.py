"""umxtools train --resume: a resumed run repeats an uninterrupted one exactly on CPU, also after
``kill -9`` between epochs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from umxtools.checkpoints import load_checkpoint
from umxtools.training import TrainConfig, train

# dropout (3 LSTM layers), a plateau scheduler that may act, and 2 steps per epoch
FLAGS = {"hidden_size": 16, "seq_dur": 1.0, "samples_per_track": 2, "batch_size": 4, "lr": 0.01, "lr_decay_patience": 0}
CLI_FLAGS = ("--hidden-size", "16", "--seq-dur", "1", "--samples-per-track", "2", "--batch-size", "4", "--lr", "0.01",
             "--lr-decay-patience", "0", "--epochs", "3")
EPOCHS = 3


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread here and in the subprocess (OMP_NUM_THREADS=1): the same arithmetic in
    both, and no spin-waiting on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _losses(folder) -> list[tuple[float, float, float]]:
    meta = json.loads((folder / "vocals.json").read_text())
    lrs = [row["lr"] for row in load_checkpoint(folder / "vocals.chkpnt")["history"]]
    return list(zip(meta["train_loss_history"], meta["valid_loss_history"], lrs))


@pytest.fixture(scope="module")
def uninterrupted(toy_cache, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("resume") / "full"
    train(TrainConfig(cache=toy_cache, valid=toy_cache, output=out, epochs=EPOCHS, **FLAGS))
    torch.set_num_threads(threads)
    return out


def test_resumed_run_equals_uninterrupted(toy_cache, tmp_path, uninterrupted):
    out = tmp_path / "split"
    # a run stopped by its time limit after epoch 1 (as a cluster job's), then resumed
    train(TrainConfig(cache=toy_cache, valid=toy_cache, output=out, epochs=EPOCHS, time_limit=1e-6, **FLAGS))
    assert len(_losses(out)) == 1
    train(TrainConfig(cache=toy_cache, valid=toy_cache, output=out, epochs=EPOCHS, resume=True, **FLAGS))
    assert _losses(out) == _losses(uninterrupted)
    for name in ("vocals.pth",):
        a, b = (torch.load(f / name, weights_only=True) for f in (out, uninterrupted))
        assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_checkpoint(f / "vocals.chkpnt") for f in (out, uninterrupted))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["scheduler"] == b["scheduler"] and a["early_stopping"] == b["early_stopping"]

    # resuming a finished run trains the epochs added to --epochs, nothing else
    train(TrainConfig(cache=toy_cache, valid=toy_cache, output=out, epochs=EPOCHS + 1, resume=True, **FLAGS))
    assert len(_losses(out)) == EPOCHS + 1 and _losses(out)[:EPOCHS] == _losses(uninterrupted)


@pytest.mark.slow
def test_resume_after_kill_9_between_epochs(run_cli, toy_cache, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "umxtools", "train", str(toy_cache), "--valid", str(toy_cache), "-o", str(out), *CLI_FLAGS, "-q"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "vocals.chkpnt").exists():  # epoch 1 is done: the process is in epoch 2
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.01)
        proc.kill()  # SIGKILL: no cleanup of any kind
    finally:
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -9
    assert load_checkpoint(out / "vocals.chkpnt")["epochs_trained"] < EPOCHS

    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *CLI_FLAGS, "--resume", "-q")
    assert r.code == 0, r.err
    assert _losses(out) == _losses(uninterrupted)
    assert not list(out.glob(".*.tmp"))
    meta = json.loads((out / "vocals.json").read_text())
    assert meta["epochs_trained"] == EPOCHS and meta["best_epoch"] == json.loads((uninterrupted / "vocals.json").read_text())["best_epoch"]
