"""umxtools train: single, joint, waveform and custom models on the toy cache; open-unmix loads
what it writes; the model learns; bad input is one line and writes nothing."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import error_line
from umxtools import transforms
from umxtools.checkpoints import load_checkpoint
from umxtools.models import Demucs, OpenUnmix, OpenUnmixJoint, load_class
from umxtools.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "examples" / "template_model.py"
# seconds-long runs: a tiny UMX on 1 s excerpts, 8 per epoch (hidden 16 keeps open-unmix's 3 LSTM
# layers, which openunmix's loader assumes)
TINY = ("--hidden-size", "16", "--seq-dur", "1", "--samples-per-track", "2", "--batch-size", "4", "--epochs", "2")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(run_cli, cache, out, *flags, quiet: bool = True):
    r = run_cli("train", cache, "--valid", cache, "-o", out, *TINY, *flags, *(("-q",) if quiet else ()))
    assert r.code == 0, r.err
    assert r.out == f"{out}\n"
    return r


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def test_umx_folder_is_open_unmix_format_and_loads_in_openunmix(run_cli, toy_cache, tmp_path, openunmix):
    out = tmp_path / "umx"
    r = _train(run_cli, toy_cache, out, quiet=False)
    log = r.err.splitlines()  # progress: one line to start, one per epoch (the bar shows on terminals only)
    assert log[0].startswith("training vocals: umxtools.models.umx:OpenUnmix (0.13 M parameters) on cpu, epochs 1..2, 2 batches each")
    assert [line.split("  ")[0] for line in log[1:]] == ["epoch 1/2", "epoch 2/2"] and log[1].endswith("best")
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "separator.json", "vocals.chkpnt", "vocals.history.csv",
                                                     "vocals.json", "vocals.pth"]
    sep = json.loads((out / "separator.json").read_text())
    assert sep == {"targets": ["vocals"], "rate": 44100.0, "sample_rate": 44100.0, "nfft": 4096, "nhop": 1024, "nb_channels": 2}
    meta = json.loads((out / "vocals.json").read_text())
    assert meta["args"]["target"] == "vocals" and meta["args"]["hidden_size"] == 16 and meta["args"]["nb_layers"] == 3
    assert meta["epochs_trained"] == 2 and len(meta["train_loss_history"]) == len(meta["valid_loss_history"]) == 2
    assert meta["best_loss"] == min(meta["valid_loss_history"]) and meta["rate"] == 44100.0
    assert meta["cache"]["tracks"] == 4 and len(meta["cache"]["fingerprint"]) == 16
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "vocals.history.csv")))
    assert [float(r["valid_loss"]) for r in rows] == meta["valid_loss_history"]

    # the checkpoint: weights-only loadable, with open-unmix's keys and the resumable state
    state = load_checkpoint(out / "vocals.chkpnt")
    assert {"epoch", "state_dict", "best_loss", "optimizer", "scheduler", "early_stopping", "rng", "history"} <= set(state)
    assert state["epoch"] == 3 and state["epochs_trained"] == 2

    # input normalisation starts from the cache statistics (max_bin bins, -mean and 1/std)
    weights = torch.load(out / "vocals.pth", weights_only=True)
    assert weights["input_mean"].shape == (1487,)

    separator = openunmix.utils.load_separator(str(out), targets=["vocals"], niter=0, device="cpu")
    theirs = separator.target_models["vocals"]
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in weights.items()}
    for k, v in weights.items():
        assert torch.equal(theirs.state_dict()[k], v), k
    ours = OpenUnmix(nb_bins=2049, hidden_size=16, max_bin=1487)
    ours.load_state_dict(weights)
    x = torch.rand(1, 2, 2049, 12)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs.eval()(x))
        estimates = separator(torch.rand(1, 2, 44100) - 0.5)
    assert estimates.shape == (1, 1, 2, 44100) and torch.isfinite(estimates).all()


def _sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    return float(10 * np.log10((reference ** 2).sum() / ((reference - estimate) ** 2).sum()))


@pytest.mark.slow
def test_umx_learns_and_beats_the_mixture(toy_cache, toy_root, tmp_path):
    """A short version of the benchmark's quality check: the losses fall and the vocals estimated
    on the held-out toy tracks (a masked mixture STFT, as open-unmix with niter 0) beat the
    mixture as an estimate."""
    out = tmp_path / "learn"
    config = TrainConfig(cache=toy_cache, valid=toy_cache, output=out, hidden_size=16, seq_dur=1.0, samples_per_track=8,
                         batch_size=4, epochs=8, lr=0.01)
    train(config)
    meta = json.loads((out / "vocals.json").read_text())
    train_loss, valid_loss = meta["train_loss_history"], meta["valid_loss_history"]
    assert train_loss[-1] < 0.3 * train_loss[0] and min(valid_loss) < 0.8 * valid_loss[0], meta
    model = OpenUnmix(nb_bins=2049, hidden_size=16, max_bin=1487)
    model.load_state_dict(torch.load(out / "vocals.pth", weights_only=True))
    gains = []
    for track in sorted((toy_root / "test").iterdir()):
        mix = torch.from_numpy(sf.read(track / "mixture.wav", dtype="float32")[0].T.copy())  # (channels, samples)
        vocals = sf.read(track / "vocals.wav", dtype="float32")[0].T
        spec = transforms.stft(mix, center=True)  # (channels, bins, frames) complex
        with torch.no_grad():
            magnitude = model.eval()(spec.abs()[None])[0]
        estimate = transforms.istft(magnitude * torch.exp(1j * spec.angle()), length=mix.shape[-1]).numpy()
        gains.append(_sdr(vocals, estimate) - _sdr(vocals, mix.numpy()))
    assert np.mean(gains) > 1.0 and min(gains) > 0, gains


def test_joint_model_sums_target_losses_and_exports_open_unmix_files(run_cli, toy_cache, tmp_path, openunmix):
    out = tmp_path / "joint"
    _train(run_cli, toy_cache, out, "--targets", "vocals,drums", "--joint")
    names = {p.name for p in out.iterdir()}
    assert {"model.json", "model.pth", "model.chkpnt", "model.history.csv", "vocals.pth", "vocals.json", "drums.pth", "drums.json",
            "separator.json", "curves.png"} == names
    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == "umxtools.model" and meta["format_version"] == 1 and meta["kind"] == "spectrogram"
    assert meta["class"] == "umxtools.models.joint:OpenUnmixJoint" and meta["targets"] == ["vocals", "drums"]
    assert meta["weights"] == "model.pth" and (meta["n_fft"], meta["n_hop"], meta["sample_rate"]) == (4096, 1024, 44100)
    model = OpenUnmixJoint(**meta["args"])
    model.load_state_dict(torch.load(out / "model.pth", weights_only=True))
    for k, target in enumerate(meta["targets"]):
        part = torch.load(out / f"{target}.pth", weights_only=True)
        assert all(torch.equal(v, model.models[k].state_dict()[n]) for n, v in part.items())
    x = torch.rand(2, 2, 2049, 9)
    assert model.eval()(x).shape == (2, 2, 2, 2049, 9)

    rows = list(csv.DictReader(open(out / "model.history.csv")))
    for row in rows:  # the loss is the sum of the per-target MSEs
        assert float(row["train_loss"]) == pytest.approx(float(row["train_loss_vocals"]) + float(row["train_loss_drums"]))
        assert float(row["valid_loss"]) == pytest.approx(float(row["valid_loss_vocals"]) + float(row["valid_loss_drums"]))
    drums = json.loads((out / "drums.json").read_text())
    assert drums["valid_loss_history"] == [float(r["valid_loss_drums"]) for r in rows]

    separator = openunmix.utils.load_separator(str(out), targets=["vocals", "drums"], niter=0)
    with torch.no_grad():
        assert separator(torch.rand(1, 2, 44100) - 0.5).shape == (1, 2, 2, 44100)


@pytest.mark.slow
def test_waveform_model_learns_on_waveforms(run_cli, toy_cache, tmp_path):
    out = tmp_path / "wave"
    small = ("--model-arg", "channels=8", "--model-arg", "depth=3", "--model-arg", "lstm_layers=1")
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, "--model", "waveform", *small, "--seq-dur", "1",
                "--samples-per-track", "8", "--batch-size", "4", "--epochs", "4", "--lr", "3e-3", "--valid-seq-dur", "2", "-q")
    assert r.code == 0, r.err
    meta = json.loads((out / "model.json").read_text())
    assert meta["kind"] == "waveform" and meta["class"] == "umxtools.models.waveform:Demucs" and meta["training"]["loss"] == "l1"
    assert meta["args"] == {"targets": ["vocals"], "nb_channels": 2, "channels": 8, "depth": 3, "lstm_layers": 1}
    # the validation loss (the same whole excerpts every epoch) falls; the training loss, over
    # new random excerpts each epoch, falls below its first value
    train_loss, valid_loss = meta["training"]["train_loss_history"], meta["training"]["valid_loss_history"]
    assert min(train_loss[1:]) < train_loss[0] and valid_loss[-1] < 0.95 * valid_loss[0], meta["training"]
    model = Demucs(**meta["args"])
    model.load_state_dict(torch.load(out / "model.pth", weights_only=True))
    assert model(torch.rand(1, 2, 10000)).shape == (1, 1, 2, 10000)

    # the SDR loss (negative SDR in dB) falls too
    out = tmp_path / "wave-sdr"
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, "--model", "waveform", *small, "--seq-dur", "1",
                "--samples-per-track", "4", "--batch-size", "4", "--epochs", "2", "--lr", "3e-3", "--valid-seq-dur", "2",
                "--loss", "sdr", "-q")
    assert r.code == 0, r.err
    training = json.loads((out / "model.json").read_text())["training"]
    assert training["loss"] == "sdr" and training["valid_loss_history"][-1] < training["valid_loss_history"][0], training


def test_template_models_train_and_rebuild_from_model_json(run_cli, toy_cache, tmp_path, monkeypatch):
    out = tmp_path / "template"
    _train(run_cli, toy_cache, out, "--targets", "vocals,bass", "--model", f"{TEMPLATE}:TemplateModel", "--model-arg", "hidden_size=8",
           "--lr", "0.01", "--epochs", "3")
    meta = json.loads((out / "model.json").read_text())
    assert meta["class"] == f"{TEMPLATE}:TemplateModel" and meta["kind"] == "spectrogram"
    assert meta["args"] == {"targets": ["vocals", "bass"], "nb_bins": 2049, "nb_channels": 2, "max_bin": 1487, "hidden_size": 8}
    model = load_class(meta["class"])(**meta["args"])  # rebuilt without the statistics: they are in the weights
    model.load_state_dict(torch.load(out / "model.pth", weights_only=True))
    assert model.eval()(torch.rand(1, 2, 2049, 5)).shape == (1, 2, 2, 2049, 5)
    valid_loss = meta["training"]["valid_loss_history"]
    assert valid_loss[-1] < 0.95 * valid_loss[0], valid_loss

    # the waveform template, named relative to the working directory (recorded absolute)
    monkeypatch.chdir(REPO)
    out = tmp_path / "template-wave"
    _train(run_cli, toy_cache, out, "--model", "examples/template_model.py:TemplateWaveformModel", "--model-arg", "filters=16",
           "--model-arg", "hidden_size=16", "--valid-seq-dur", "2")
    meta = json.loads((out / "model.json").read_text())
    assert meta["kind"] == "waveform" and meta["class"] == f"{TEMPLATE}:TemplateWaveformModel"


# --- bad input: one line, non-zero exit, nothing written ------------------------------------------


def test_missing_target_and_stft_mismatch_write_nothing(run_cli, toy_cache, tmp_path):
    out = tmp_path / "m"
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, "--target", "piano", *TINY)
    assert error_line(r) == f"umxtools: error: {toy_cache}: has no source 'piano' (sources: vocals, drums, bass, other)"
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, "--nfft", "2048", *TINY)
    assert error_line(r) == (f"umxtools: error: {toy_cache}: cache was built with n_fft=4096, but --nfft 2048 was given; "
                             "rebuild the cache with --nfft 2048 or drop the flag")
    r = run_cli("train", toy_cache, "--valid", tmp_path / "none.h5", "-o", out, *TINY)
    assert error_line(r) == f"umxtools: error: {tmp_path / 'none.h5'}: no such cache file (made by: umxtools cache musdb|folder|module SOURCE -o PATH)"
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, "--targets", "vocals,drums", *TINY)
    assert error_line(r) == "umxtools: error: several targets with --model umx need --joint (or one command per target)"
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, "--amp", "fp16", "--device", "cpu", *TINY)
    assert error_line(r) == "umxtools: error: --amp fp16 needs a CUDA device (on cpu: --amp bf16, or float32 without --amp)"
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, "--model", f"{TEMPLATE}:Nothing", *TINY)
    assert error_line(r) == f"umxtools: error: {TEMPLATE}: has no class 'Nothing'"
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, "--model", "waveform", "--model-arg", "nb_channels=1", *TINY)
    assert error_line(r) == "umxtools: error: --model-arg nb_channels: umxtools sets it from the cache and the flags"
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, "--model", "nonsense", *TINY)
    from umxtools.models import MODELS

    offered = " nor ".join(repr(name) for name in MODELS)  # every registered family, umx first
    assert list(MODELS)[:2] == ["umx", "waveform"]
    assert r.code == 2 and f"'nonsense' is neither {offered} nor MODULE:CLASS" in r.err
    assert not out.exists()


def test_folder_of_another_run_needs_force_or_resume(run_cli, toy_cache, tmp_path):
    out = tmp_path / "m"
    _train(run_cli, toy_cache, out, "--epochs", "1")
    before = _files(out)
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *TINY)
    assert error_line(r) == (f"umxtools: error: {out}: holds a run of 'vocals' (vocals.chkpnt); "
                             "pass --resume to continue it or --force to replace it")
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, "--model", "waveform", *TINY)
    assert error_line(r) == f"umxtools: error: {out}: holds another run (vocals.chkpnt); pass --force to replace it, or use another folder"
    assert _files(out) == before
    # another target beside it is open-unmix's usual folder: allowed, and listed in separator.json
    _train(run_cli, toy_cache, out, "--target", "drums", "--epochs", "1")
    assert json.loads((out / "separator.json").read_text())["targets"] == ["vocals", "drums"]
    _train(run_cli, toy_cache, out, "--force", "--hidden-size", "8", "--epochs", "1")
    assert json.loads((out / "vocals.json").read_text())["args"]["hidden_size"] == 8


def test_bad_checkpoints_are_refused_and_kept(run_cli, toy_cache, tmp_path):
    out = tmp_path / "m"
    _train(run_cli, toy_cache, out, "--epochs", "1")
    chkpnt = out / "vocals.chkpnt"

    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *TINY, "--resume", "--hidden-size", "32")
    assert error_line(r) == (f"umxtools: error: {chkpnt}: a checkpoint of another run: model.hidden_size is 16 there, 32 here; "
                             "pass the same flags to resume, or --force to start over")
    # a checkpoint of another model under this run's name
    wave = tmp_path / "wave"
    _train(run_cli, toy_cache, wave, "--model", "waveform", "--model-arg", "channels=4", "--model-arg", "depth=2",
           "--model-arg", "lstm_layers=0", "--epochs", "1", "--valid-seq-dur", "1")
    good = chkpnt.read_bytes()
    shutil.copy(wave / "model.chkpnt", chkpnt)
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *TINY, "--resume")
    assert error_line(r).startswith(f"umxtools: error: {chkpnt}: a checkpoint of another run: class is "
                                    '"umxtools.models.waveform:Demucs" there, "umxtools.models.umx:OpenUnmix" here')

    chkpnt.write_bytes(good[: len(good) // 2])  # truncated, as by a full disk
    before = _files(out)
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *TINY, "--resume")
    assert error_line(r) == f"umxtools: error: {chkpnt}: unreadable checkpoint (truncated or not a torch file); delete it or pass --force"
    assert _files(out) == before

    torch.save({"format": "umxtools.checkpoint", "format_version": 1, "payload": np.arange(3)}, chkpnt)  # not weights-only
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *TINY, "--resume")
    assert error_line(r).startswith(f"umxtools: error: {chkpnt}: refused by weights-only loading")


NAN_MODEL = '''
import torch
from torch import nn


class NaNLater(nn.Module):
    """Learns like a gain, until its third training step: then its output is NaN."""

    kind = "spectrogram"

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))
        self.steps = 0

    def forward(self, x):
        if self.training:
            self.steps += 1
        return x * self.gain * (float("nan") if self.steps >= 3 else 1.0)
'''


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(run_cli, toy_cache, tmp_path):
    model = tmp_path / "nan_model.py"
    model.write_text(NAN_MODEL)
    out = tmp_path / "m"
    # 2 steps per epoch: epoch 1 is fine, the first step of epoch 2 is NaN
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, "--model", f"{model}:NaNLater", "--seq-dur", "1",
                "--samples-per-track", "2", "--batch-size", "4", "--epochs", "3", "-q")
    assert error_line(r) == (f"umxtools: error: {out}: loss is NaN in epoch 2 (batch 1); stopped, the checkpoint of epoch 1 is kept; "
                             "lower --lr or check the data")
    state = load_checkpoint(out / "model.chkpnt")
    assert state["epochs_trained"] == 1 and torch.isfinite(state["state_dict"]["gain"]).all()
    assert json.loads((out / "model.json").read_text())["training"]["epochs_trained"] == 1
    assert not list(out.glob(".*.tmp"))


# --- safe by construction: locks, names, inputs, unwritable outputs (issue 13) ----------------------


def test_a_second_train_of_the_same_run_fails_at_once_naming_the_holder(run_cli, toy_cache, tmp_path):
    """Two jobs into one model folder and target (a requeued job while the first still runs)."""
    import os
    import socket

    from umxtools import fileio

    out = tmp_path / "m"
    _train(run_cli, toy_cache, out, "--epochs", "1")
    before = _files(out)
    with fileio.exclusive(out / "vocals.chkpnt"):  # the first job, still training
        for flags in (("--resume",), ("--force",)):
            r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *TINY, *flags)
            assert error_line(r) == (f"umxtools: error: {out / 'vocals.chkpnt'}: another umxtools process is writing it "
                                     f"(pid {os.getpid()} on host {socket.gethostname()}); wait for it to end or stop it")
        assert {k: v for k, v in _files(out).items() if not k.endswith(".lock")} == before
        # another target into the same folder is another run: it trains side by side
        _train(run_cli, toy_cache, out, "--target", "drums", "--epochs", "1")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no lock or temporary left behind
    # a run that fails under the lock in a folder it made leaves no folder behind
    model = tmp_path / "nan_at_once.py"
    model.write_text(NAN_MODEL.replace("self.steps >= 3", "self.steps >= 1"))
    fresh = tmp_path / "fresh"
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", fresh, *TINY, "--resume", "--model", f"{model}:NaNLater", "-q")
    assert error_line(r) == (f"umxtools: error: {fresh}: loss is NaN in epoch 1 (batch 1); stopped, nothing was written; "
                             "lower --lr or check the data")
    assert not fresh.exists()


def test_train_never_writes_over_its_caches_or_outside_its_folder(run_cli, toy_cache, tmp_path):
    cache = tmp_path / "caches" / "train.h5"
    cache.parent.mkdir()
    shutil.copy(toy_cache, cache)
    before = cache.read_bytes()
    r = run_cli("train", cache, "--valid", cache, "-o", cache, *TINY, "--force")
    assert r.code == 2 and "is a file" in r.err  # Click's check of -o
    from umxtools.errors import OutputError

    with pytest.raises(OutputError, match=f"^{cache}: is the cache {cache}; write the model folder somewhere else"):
        train(TrainConfig(cache=cache, valid=cache, output=cache, force=True, epochs=1))
    assert cache.read_bytes() == before
    # a target names the run's files: it must stay a plain name
    (tmp_path / "evil.pth").write_bytes(b"a colleague's file")
    r = run_cli("train", cache, "--valid", cache, "-o", tmp_path / "m", *TINY, "--target", "../evil", "--force")
    assert error_line(r) == "umxtools: error: --target: target '../evil' contains a path separator; it must be a plain file name"
    r = run_cli("train", cache, "--valid", cache, "-o", tmp_path / "m", *TINY, "--joint", "--targets", "vocals,../../evil")
    assert error_line(r) == "umxtools: error: --targets: target '../../evil' contains a path separator; it must be a plain file name"
    assert (tmp_path / "evil.pth").read_bytes() == b"a colleague's file" and not (tmp_path / "m").exists()
    # a model folder beside the cache is fine
    _train(run_cli, cache, cache.parent / "model", "--epochs", "1")
    assert cache.read_bytes() == before


def test_read_only_output_is_reported_before_the_first_epoch(run_cli, toy_cache, tmp_path):
    from tests.test_separate_safety import _unwritable

    out = _unwritable(tmp_path)
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *TINY, "--epochs", "1000")
    assert error_line(r) == f"umxtools: error: {out}: permission denied"
