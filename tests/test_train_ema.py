"""--ema: the weights' moving average after each optimiser step, kept in the checkpoint, written
beside the raw weights, and loaded by separate --ema."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from umxtools.checkpoints import load_checkpoint
from umxtools.errors import ModelError
from umxtools.models.loading import load_model
from umxtools.train_setup import prepare
from umxtools.training import TrainConfig, train

# a tiny UMX; at most 2 batches per epoch on the toy cache, so one optimiser step per epoch
FLAGS = {"hidden_size": 16, "seq_dur": 1.0, "samples_per_track": 2, "batch_size": 4, "lr": 0.01, "accumulate": 2, "ema": 0.75}
EPOCHS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(cache, out, **more) -> TrainConfig:
    return TrainConfig(cache=cache, valid=None, output=out, **{"epochs": EPOCHS, **FLAGS, **more})


def test_ema_follows_the_recursion_and_resumes_exactly(toy_cache, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train(_config(toy_cache, full))
    # the split run stops after each epoch (--time-limit) and resumes: its checkpoints are the
    # weights after each optimiser step
    weights = []
    for epoch in range(1, EPOCHS + 1):
        train(_config(toy_cache, split, resume=True, time_limit=None if epoch == EPOCHS else 1e-6))
        state = load_checkpoint(split / "vocals.chkpnt")
        assert state["epochs_trained"] == epoch and state["optimizer_steps"] == epoch
        weights.append(state["state_dict"])
    a, b = load_checkpoint(split / "vocals.chkpnt"), load_checkpoint(full / "vocals.chkpnt")
    assert set(a["ema"]) == set(b["ema"]) == set(b["state_dict"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in b["ema"])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])

    decay = FLAGS["ema"]
    ema = {k: v.clone() for k, v in prepare(_config(toy_cache, tmp_path / "x")).model.state_dict().items()}
    for w in weights:
        for k, v in w.items():  # a batch-norm's integer count is copied
            ema[k] = ema[k].mul_(decay).add_(v, alpha=1 - decay) if v.is_floating_point() else v.clone()
    assert all(torch.equal(ema[k], b["ema"][k]) for k in ema)
    assert not all(torch.equal(ema[k], b["state_dict"][k]) for k in ema)

    saved = torch.load(full / "ema.vocals.pth", weights_only=True)  # no --valid: every epoch is kept
    assert all(torch.equal(saved[k], ema[k]) for k in ema)
    assert json.loads((full / "vocals.json").read_text())["ema_weights"] == "ema.vocals.pth"
    # open-unmix's loader takes the first `<target>*.pth` it globs: only the raw weights match
    assert sorted(full.glob("vocals*.pth")) == [full / "vocals.pth"]


def test_separate_loads_the_raw_weights_unless_ema(toy_cache, tmp_path):
    out = tmp_path / "m"
    train(_config(toy_cache, out, epochs=1))
    raw, ema = load_model(out, identity=False), load_model(out, identity=False, ema=True)
    saved = torch.load(out / "ema.vocals.pth", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in ema.umx["vocals"].state_dict().items())
    assert not torch.equal(raw.umx["vocals"].fc1.weight, ema.umx["vocals"].fc1.weight)

    plain = tmp_path / "plain"
    train(TrainConfig(cache=toy_cache, valid=None, output=plain, epochs=1, **{**FLAGS, "ema": 0.0}))
    assert not (plain / "ema.vocals.pth").exists()
    assert json.loads((plain / "vocals.json").read_text())["ema_weights"] is None
    with pytest.raises(ModelError, match="names no EMA weights"):
        load_model(plain, ema=True)
    shutil.rmtree(plain)


def test_a_joint_run_exports_each_targets_ema(toy_cache, tmp_path):
    out = tmp_path / "joint"
    train(_config(toy_cache, out, epochs=1, targets=("vocals", "drums"), joint=True))
    whole = torch.load(out / "ema.model.pth", weights_only=True)
    assert json.loads((out / "model.json").read_text())["ema_weights"] == "ema.model.pth"
    for i, t in enumerate(("vocals", "drums")):
        part = torch.load(out / f"ema.{t}.pth", weights_only=True)
        assert set(part) == set(torch.load(out / f"{t}.pth", weights_only=True))
        assert all(torch.equal(v, whole[f"models.{i}.{k}"]) for k, v in part.items())
        assert json.loads((out / f"{t}.json").read_text())["ema_weights"] == f"ema.{t}.pth"
    model = load_model(out, identity=False, ema=True)
    assert torch.equal(model.umx["drums"].fc1.weight, whole["models.1.fc1.weight"])
