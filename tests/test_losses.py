"""The waveform loss terms against analytic cases, and ``+``-joined sums against their terms."""

from __future__ import annotations

import json
import math

import pytest
import torch

from umxtools.losses import LOSS_FUNCTIONS, MRSTFT_SIZES, loss_function, loss_name, loss_terms


@pytest.fixture
def signals():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 3, 2, 8192, generator=g)  # (batch, targets, channels, samples)
    mix = target.sum(1)  # (batch, channels, samples)
    return target, mix


@pytest.mark.parametrize("name", ["l1", "mse", "sdr", "mrstft", "cstft"])
def test_each_term_is_zero_for_identical_signals(signals, name):
    target, mix = signals
    loss = LOSS_FUNCTIONS[name](target.clone(), target, mix)
    assert loss.shape == (3,)
    # SDR is negative dB: identical signals score 10 log10(1 + |y|^2 / (tau |x|^2)), not 0
    if name == "sdr":
        floor = 1e-3 * (mix ** 2).sum(-1)[:, None] + 1e-8
        expect = -(10 * (((target ** 2).sum(-1) + floor) / floor).log10()).mean(dim=(0, 2))
        torch.testing.assert_close(loss, expect)
    else:
        torch.testing.assert_close(loss, torch.zeros(3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("a", [0.5, 2.0])
def test_each_term_of_a_scaled_signal(signals, a):
    target, mix = signals
    estimate = a * target
    torch.testing.assert_close(LOSS_FUNCTIONS["l1"](estimate, target, mix), abs(1 - a) * target.abs().mean(dim=(0, 2, 3)))
    torch.testing.assert_close(LOSS_FUNCTIONS["mse"](estimate, target, mix), (1 - a) ** 2 * (target ** 2).mean(dim=(0, 2, 3)))
    # spectral convergence |1 - a| plus log-magnitude L1 |ln a|, at every resolution
    torch.testing.assert_close(LOSS_FUNCTIONS["mrstft"](estimate, target, mix), torch.full((3,), abs(1 - a) + abs(math.log(a))),
                               rtol=1e-4, atol=1e-5)
    # without the floor's share, SDR = 10 log10(|y|^2 / ((1 - a)^2 |y|^2)) = -20 log10|1 - a|
    no_floor = LOSS_FUNCTIONS["sdr"](estimate, target, torch.zeros_like(mix))
    torch.testing.assert_close(no_floor, torch.full((3,), 20 * math.log10(abs(1 - a))), rtol=1e-5, atol=1e-4)


def test_mrstft_leaves_out_sizes_longer_than_the_excerpt(signals):
    target, mix = signals
    short = target[..., :1000]  # 4096 and 2048 need more than half their size
    assert [n for n in MRSTFT_SIZES if n // 2 < 1000] == [1024, 512, 256]
    torch.testing.assert_close(LOSS_FUNCTIONS["mrstft"](2 * short, short, mix[..., :1000]), torch.full((3,), 1 + math.log(2)),
                               rtol=1e-4, atol=1e-5)


def test_a_sum_is_the_sum_of_its_terms(signals):
    target, mix = signals
    estimate = target + 0.3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    total = loss_function("l1+mrstft+sdr")(estimate, target, mix)
    parts = sum(LOSS_FUNCTIONS[t](estimate, target, mix) for t in ("l1", "mrstft", "sdr"))
    torch.testing.assert_close(total, parts)
    assert loss_function("l1") is LOSS_FUNCTIONS["l1"]


def test_loss_names_are_checked():
    assert loss_terms("l1+mrstft") == ("l1", "mrstft")
    assert loss_name("waveform", "l1+mrstft") == "l1+mrstft"
    assert loss_name("spectrogram", "l1+mrstft") == "mse"  # spectrogram models always train on the MSE
    with pytest.raises(ValueError, match="unknown loss 'l2'"):
        loss_terms("l1+l2")
    with pytest.raises(ValueError, match="names a term twice"):
        loss_terms("l1+l1")


def test_train_refuses_an_unknown_loss_term(run_cli, toy_cache, tmp_path):
    r = run_cli("train", str(toy_cache), "--model", "waveform", "-o", str(tmp_path / "m"), "--loss", "l1+foo")
    assert r.code == 2 and "unknown loss 'foo'" in r.err


def test_a_waveform_model_trains_on_a_summed_loss(run_cli, toy_cache, tmp_path):
    out = tmp_path / "wave"
    small = ("--model-arg", "channels=8", "--model-arg", "depth=3", "--model-arg", "lstm_layers=1")
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, "--model", "waveform", *small, "--seq-dur", "1",
                "--samples-per-track", "2", "--batch-size", "4", "--epochs", "1", "--valid-seq-dur", "1", "--loss", "l1+mrstft", "-q")
    assert r.code == 0, r.err
    training = json.loads((out / "model.json").read_text())["training"]
    assert training["loss"] == "l1+mrstft" and math.isfinite(training["valid_loss_history"][0])
