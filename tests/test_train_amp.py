"""--amp bf16 on the CPU: every family's forward pass runs under torch's autocast, the weights
and the loss stay float32, and the run trains as the float32 one does, up to bfloat16 rounding."""

from __future__ import annotations

import math

import pytest
import torch

from umxtools.checkpoints import load_checkpoint
from umxtools.training import TrainConfig, train

pytest.importorskip("demucs.htdemucs", reason="HTDemucs is demucs's class: pip install 'umxtools[htdemucs]'")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_ROFORMER = {"dim": 8, "depth": 1, "heads": 1, "dim_head": 8}
FAMILIES = {
    "umx": {"hidden_size": 16},
    "bsroformer": {"model_args": TINY_ROFORMER},
    "melroformer": {"model_args": {**TINY_ROFORMER, "num_bands": 8}},
    "htdemucs": {"model_args": {"segment": 1, "demucs_args": {"channels": 8, "t_layers": 1}}},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_trains_every_family_on_the_cpu(toy_cache, tmp_path, family, monkeypatch):
    seen = []
    real = torch.autocast

    def recording(device_type, *args, **kwargs):  # the autocast contexts the training step opens
        seen.append((device_type, kwargs.get("dtype")))
        return real(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", recording)
    runs = {}
    for amp in (None, "bf16"):
        out = tmp_path / f"{family}-{amp}"
        train(TrainConfig(cache=toy_cache, valid=None, output=out, model=family, device="cpu", amp=amp, seq_dur=1.0, batch_size=2,
                          samples_per_track=1, epochs=1, loss=None if family == "umx" else "l1", warmup_steps=0, seed=0,
                          **FAMILIES[family]))
        state = load_checkpoint(next(out.glob("*.chkpnt")))
        runs[amp] = state["history"][0]["train_loss"]
        assert all(w.dtype == torch.float32 for w in state["state_dict"].values() if w.is_floating_point())
    assert ("cpu", torch.bfloat16) in seen
    assert math.isfinite(runs["bf16"]) and runs["bf16"] != runs[None]
    assert runs["bf16"] == pytest.approx(runs[None], rel=0.05)
