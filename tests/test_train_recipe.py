"""The training recipe flags: per-family defaults, the warm-up and cosine schedule, gradient
accumulation and clipping, AdamW; a resumed run repeats an uninterrupted one exactly."""

from __future__ import annotations

import math

import pytest
import torch

from umxtools.checkpoints import load_checkpoint
from umxtools.train_setup import RECIPES, with_recipe
from umxtools.training import TrainConfig, train

# a tiny UMX, 3 epochs; 2 batches per epoch on the toy cache at most, one step per 2 batches
FLAGS = {"hidden_size": 16, "seq_dur": 1.0, "samples_per_track": 2, "batch_size": 4, "lr": 0.01, "optimizer": "adamw",
         "lr_schedule": "cosine", "warmup_steps": 2, "clip_grad_norm": 0.5, "accumulate": 2}
EPOCHS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_each_family_has_its_recipe_and_flags_override_it(tmp_path):
    base = {"cache": tmp_path, "valid": None, "output": tmp_path / "m"}
    umx = with_recipe(TrainConfig(**base))
    assert (umx.loss, umx.optimizer, umx.lr_schedule, umx.warmup_steps, umx.clip_grad_norm) == ("l1", "adam", "plateau", 0, 0.0)
    assert with_recipe(TrainConfig(**base, model="my.module:Net")).optimizer == "adam"
    roformer = with_recipe(TrainConfig(**base, model="bsroformer"))
    assert (roformer.loss, roformer.optimizer, roformer.lr_schedule) == ("l1+cstft", "adamw", "cosine")
    assert with_recipe(TrainConfig(**base, model="htdemucs", loss="sdr", warmup_steps=7)).warmup_steps == 7
    assert with_recipe(TrainConfig(**base, model="htdemucs", loss="sdr")).loss == "sdr"
    assert set(RECIPES) == {"umx", "waveform", "bsroformer", "melroformer", "htdemucs", "custom"}


def _history(folder):
    state = load_checkpoint(folder / "vocals.chkpnt")
    return state, [(r["train_loss"], r["valid_loss"], r["lr"]) for r in state["history"]]


@pytest.fixture(scope="module")
def uninterrupted(toy_cache, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("recipe") / "full"
    train(TrainConfig(cache=toy_cache, valid=toy_cache, output=out, epochs=EPOCHS, **FLAGS))
    torch.set_num_threads(threads)
    return out


def test_cosine_with_warmup_follows_the_formula(uninterrupted):
    state, rows = _history(uninterrupted)
    steps = state["optimizer_steps"]
    assert steps % EPOCHS == 0 and steps > 0
    per_epoch = steps // EPOCHS
    assert isinstance(state["optimizer"]["param_groups"][0]["lr"], float)
    for epoch, (_, _, lr) in enumerate(rows, 1):
        last = epoch * per_epoch - 1  # the epoch's last step
        expect = 0.01 * min(1, (last + 1) / 2) * 0.5 * (1 + math.cos(math.pi * last / steps))
        assert lr == pytest.approx(expect, rel=1e-12, abs=1e-15)
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.01  # the plateau's base rate, untouched


def test_resumed_recipe_run_equals_uninterrupted(toy_cache, tmp_path, uninterrupted):
    out = tmp_path / "split"
    train(TrainConfig(cache=toy_cache, valid=toy_cache, output=out, epochs=EPOCHS, time_limit=1e-6, **FLAGS))
    assert len(_history(out)[1]) == 1
    train(TrainConfig(cache=toy_cache, valid=toy_cache, output=out, epochs=EPOCHS, resume=True, **FLAGS))
    (a, rows_a), (b, rows_b) = _history(out), _history(uninterrupted)
    assert rows_a == rows_b and a["optimizer_steps"] == b["optimizer_steps"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_a_resume_with_another_recipe_is_refused(toy_cache, tmp_path, uninterrupted, run_cli):
    from umxtools.errors import CheckpointError

    with pytest.raises(CheckpointError, match="accumulate is 2 there, 1 here"):
        train(TrainConfig(cache=toy_cache, valid=toy_cache, output=uninterrupted, epochs=EPOCHS + 1, resume=True,
                          **{**FLAGS, "accumulate": 1}))


def test_a_checkpoint_from_before_the_recipe_flags_resumes_with_their_old_values(toy_cache, tmp_path):
    """Runs trained before --optimizer, --lr-schedule, --warmup-steps, --clip-grad-norm and
    --accumulate existed hold none of them in their identity: they were adam, plateau, no warm-up,
    no clipping, one batch a step, and resume when the flags say so (and only then)."""
    from umxtools.errors import CheckpointError
    from umxtools.model_folder import IDENTITY_BEFORE_RECIPE, save_torch

    old = {k: v for k, v in FLAGS.items() if k not in IDENTITY_BEFORE_RECIPE}
    out = tmp_path / "old"
    train(TrainConfig(cache=toy_cache, valid=toy_cache, output=out, epochs=1, **old))
    path = out / "vocals.chkpnt"
    state = load_checkpoint(path)
    assert all(state["identity"][k] == v for k, v in IDENTITY_BEFORE_RECIPE.items())
    for key in IDENTITY_BEFORE_RECIPE:
        del state["identity"][key]
    save_torch(path, state)
    with pytest.raises(CheckpointError, match="optimizer is \"adam\" there, \"adamw\" here"):
        train(TrainConfig(cache=toy_cache, valid=toy_cache, output=out, epochs=2, resume=True, **{**old, "optimizer": "adamw"}))
    train(TrainConfig(cache=toy_cache, valid=toy_cache, output=out, epochs=2, resume=True, **old))
    assert len(_history(out)[1]) == 2
