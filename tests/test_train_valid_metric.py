"""--valid-metric sdr|loss: the best weights by the validation uSDR (MDX's definition) or loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from umxtools.checkpoints import load_checkpoint
from umxtools.errors import UsageError
from umxtools.evaluation import whole_track_sdr
from umxtools.train_setup import with_recipe
from umxtools.training import TrainConfig, train, usdr

WAVE = {"model": "waveform", "model_args": {"channels": 8, "depth": 3, "lstm_layers": 1}, "seq_dur": 1.0, "valid_seq_dur": 2.0,
        "samples_per_track": 2, "batch_size": 4, "epochs": 3, "lr": 3e-3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_usdr_is_the_evaluations():
    rng = np.random.default_rng(0)
    ref, est = rng.standard_normal((3, 2, 2, 500)), rng.standard_normal((3, 2, 2, 500))
    est[1, 0] = ref[1, 0]  # a perfect estimate: the epsilon bounds it
    got = usdr(torch.from_numpy(ref), torch.from_numpy(est))
    assert got.shape == (3, 2)
    for b in range(3):
        for t in range(2):  # evaluation's arrays are (samples, channels)
            assert float(got[b, t]) == pytest.approx(whole_track_sdr(ref[b, t].T, est[b, t].T), rel=1e-12)


def test_defaults_per_family(tmp_path):
    base = {"cache": tmp_path, "valid": None, "output": tmp_path}
    assert with_recipe(TrainConfig(**base)).valid_metric == "loss"
    assert with_recipe(TrainConfig(**base, model="waveform")).valid_metric == "loss"
    for model in ("bsroformer", "melroformer", "htdemucs"):
        assert with_recipe(TrainConfig(**base, model=model)).valid_metric == "sdr"


def test_sdr_picks_the_best_weights(toy_cache, tmp_path):
    out = tmp_path / "wave"
    train(TrainConfig(cache=toy_cache, valid=toy_cache, output=out, valid_metric="sdr", **WAVE))
    state = load_checkpoint(out / "model.chkpnt")
    sdrs = [r["valid_sdr"] for r in state["history"]]
    assert all(isinstance(v, float) and np.isfinite(v) for v in sdrs)
    best = max(range(len(sdrs)), key=lambda i: (sdrs[i], -i)) + 1  # the first of equal values
    assert state["best_epoch"] == best and state["early_stopping"]["best"] == -sdrs[best - 1]
    assert [r["best"] for r in state["history"]] == [sdrs[i] == max(sdrs[: i + 1]) for i in range(len(sdrs))]
    training = json.loads((out / "model.json").read_text())["training"]
    assert training["weights_kept"] == "best_valid_sdr" and training["args"]["valid_metric"] == "sdr"
    assert "valid_sdr" in (out / "model.history.csv").read_text().splitlines()[0].split(",")


def test_sdr_of_a_spectrogram_model_is_refused(toy_cache, tmp_path, run_cli):
    with pytest.raises(UsageError, match="--valid-metric sdr needs a waveform model"):
        train(TrainConfig(cache=toy_cache, valid=toy_cache, output=tmp_path / "m", valid_metric="sdr"))
    assert not (tmp_path / "m").exists()
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", tmp_path / "m", "--valid-metric", "sdr")
    assert r.code != 0 and "--valid-metric sdr needs a waveform model" in r.err and len(r.err.strip().splitlines()) == 1
