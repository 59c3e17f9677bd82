"""Distributed training: ``torchrun --nproc-per-node 2 -m umxtools train`` on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from umxtools.checkpoints import load_checkpoint
from umxtools.training import TrainConfig, train

# 4 tracks x 4 excerpts = 16 per epoch: 8 per rank, 2 steps of 4 on each
FLAGS = ("--hidden-size", "16", "--seq-dur", "1", "--samples-per-track", "4", "--batch-size", "4", "--lr", "0.01")


@pytest.mark.slow
def test_two_processes_on_cpu_train_and_write_the_single_process_format(toy_cache, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "umxtools",
           "train", str(toy_cache), "--valid", str(toy_cache), "-o", str(out), *FLAGS, "--epochs", "3"]
    # one thread per process: two processes on two cores
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == f"{out}\n"  # rank 0 alone prints (and writes)
    assert r.stderr.count("epoch 3/3") == 1

    meta = json.loads((out / "vocals.json").read_text())
    losses = meta["train_loss_history"]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    ddp = load_checkpoint(out / "vocals.chkpnt")
    assert ddp["world_size"] == 2
    # the ranks drew disjoint halves of the epoch's excerpts: together, every one of them
    assert [row["samples"] for row in ddp["history"]] == [16, 16, 16]

    # the same files, keys and shapes as a single-process run (no "module." prefixes)
    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(cache=toy_cache, valid=toy_cache, output=single, hidden_size=16, seq_dur=1.0, samples_per_track=4,
                          batch_size=4, lr=0.01, epochs=1))
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())
    one = load_checkpoint(single / "vocals.chkpnt")
    assert set(ddp) == set(one)
    assert {k: v.shape for k, v in ddp["state_dict"].items()} == {k: v.shape for k, v in one["state_dict"].items()}
    assert ddp["optimizer"]["param_groups"][0].keys() == one["optimizer"]["param_groups"][0].keys()
    assert set(ddp["optimizer"]["state"]) == set(one["optimizer"]["state"])
    weights = torch.load(out / "vocals.pth", weights_only=True)
    assert weights.keys() == torch.load(single / "vocals.pth", weights_only=True).keys()
    assert set(meta) == set(json.loads((single / "vocals.json").read_text()))


# today's families under torchrun: tiny sizes, 1 s excerpts, the waveform L1
FAMILY_FLAGS = {
    "bsroformer": ("--model-arg", "dim=8", "--model-arg", "depth=1", "--model-arg", "heads=1", "--model-arg", "dim_head=8"),
    "htdemucs": ("--model-arg", "segment=1", "--model-arg", 'demucs_args={"channels": 8, "t_layers": 1}'),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_FLAGS)
def test_two_processes_train_todays_families(toy_cache, tmp_path, family):
    out = tmp_path / family
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "umxtools",
           "train", str(toy_cache), "-o", str(out), "--model", family, *FAMILY_FLAGS[family], "--seq-dur", "1",
           "--samples-per-track", "4", "--batch-size", "2", "--loss", "l1", "--warmup-steps", "0", "--epochs", "2"]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == f"{out}\n" and r.stderr.count("epoch 2/2") == 1
    state = load_checkpoint(out / "model.chkpnt")
    assert state["world_size"] == 2 and [row["samples"] for row in state["history"]] == [16, 16]
    assert all(k.split(".")[0] != "module" for k in state["state_dict"])  # the single-process names
    model = json.loads((out / "model.json").read_text())
    assert model["class"] == f"umxtools.models.{family}:" + {"bsroformer": "BSRoformer", "htdemucs": "HTDemucs"}[family]
