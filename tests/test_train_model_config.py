"""train --model-config: an MSST YAML gives the RoFormer family, its arguments, the targets,
channels and excerpt length; trained RoFormers are separated with MSST's chunked rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import error_line
from tests.test_segments import msst_demix
from umxtools.checkpoints import load_checkpoint
from umxtools.models import MODELS, BSRoformer, MelBandRoformer
from umxtools.models.loading import load_model
from umxtools.msst import ARCHITECTURES
from umxtools.train_setup import MSST_FAMILIES, prepare, with_model_config
from umxtools.training import TrainConfig

RATE = 44100  # the toy cache's
CHUNK = 22050  # audio: chunk_size, half a second
# a tiny BS-RoFormer in MSST's layout (dim 8, one layer, one head, a 256-point STFT in 2 bands)
YAML = """\
audio:
  chunk_size: {chunk}
  sample_rate: {rate}
model:
  dim: 8
  depth: 1
  stereo: {stereo}
  num_stems: {num_stems}
  time_transformer_depth: 1
  freq_transformer_depth: 1
  {bands}
  dim_head: 8
  heads: 1
  flash_attn: false
  stft_n_fft: 256
  stft_hop_length: 64
  stft_win_length: 256
  mask_estimator_depth: 1
  mlp_expansion_factor: 1
  multi_stft_resolutions_window_sizes: !!python/tuple [256]
training:
  instruments: [vocals, other]
  target_instrument: {target}
  lr: 5.0e-05
  optimizer: prodigy
inference:
  num_overlap: 2
  batch_size: 4
"""
BS_BANDS = "freqs_per_bands: !!python/tuple [64, 65]"
MEL_BANDS = f"num_bands: 4\n  sample_rate: {RATE}"
FAST = {"samples_per_track": 1, "batch_size": 2, "epochs": 1, "warmup_steps": 0}
CLI_FAST = ("--samples-per-track", "1", "--batch-size", "2", "--warmup-steps", "0", "-q")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_config(folder, name="config.yaml", *, chunk=CHUNK, rate=RATE, stereo="true", num_stems=2, bands=BS_BANDS, target="null"):
    path = folder / name
    path.write_text(YAML.format(chunk=chunk, rate=rate, stereo=stereo, num_stems=num_stems, bands=bands, target=target))
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("config"))


def test_the_families_are_msst_architectures():
    assert {a: MODELS[f] for a, f in MSST_FAMILIES.items()} == ARCHITECTURES


def test_the_config_gives_family_args_targets_channels_and_excerpt(tmp_path, config):
    base = {"cache": tmp_path / "c.h5", "valid": None, "output": tmp_path / "out"}
    got, msst = with_model_config(TrainConfig(**base, model_config=str(config)))
    assert got.model == "bsroformer" and got.targets == ("vocals", "other") and got.nb_channels == 2
    assert int(got.seq_dur * RATE) == CHUNK and got.model_config == str(config.resolve())
    assert "num_stems" not in got.model_args and "stereo" not in got.model_args
    assert got.model_args == {k: v for k, v in msst.model.items() if k not in ("num_stems", "stereo")}
    assert with_model_config(got)[0] == got  # read in once, read in again: the same
    # flags given win; --model-arg overrides the config's argument
    given = TrainConfig(**base, model_config=str(config), model="bsroformer", targets=("vocals",), seq_dur=1.0, nb_channels=1,
                        model_args={"depth": 2}, given=("model", "targets", "seq_dur", "nb_channels"))
    got = with_model_config(given)[0]
    assert (got.targets, got.seq_dur, got.nb_channels, got.model_args["depth"]) == (("vocals",), 1.0, 1, 2)
    # the CLI says which flags were given: the default value given explicitly is kept too
    got = with_model_config(TrainConfig(**base, model_config=str(config), targets=("vocals",), nb_channels=2,
                                        given=("targets", "nb_channels")))[0]
    assert got.targets == ("vocals",) and got.nb_channels == 2

    mel = write_config(tmp_path, "mel.yaml", stereo="false", num_stems=1, bands=MEL_BANDS, target="vocals", chunk=44101)
    got = with_model_config(TrainConfig(**base, model_config=str(mel)))[0]
    assert got.model == "melroformer" and got.targets == ("vocals",) and got.nb_channels == 1
    assert "sample_rate" not in got.model_args  # umxtools passes the cache's
    assert int(got.seq_dur * RATE) == 44101  # the loaders' excerpt is chunk_size samples exactly


def test_prepare_builds_the_model_and_records_the_msst_rule(toy_cache, tmp_path, config):
    plan = prepare(TrainConfig(cache=toy_cache, valid=None, output=tmp_path / "out", model_config=str(config), **FAST))
    model = plan.model
    assert isinstance(model, BSRoformer) and model.num_stems == 2 and model.stereo and model.freqs_per_bands == [64, 65]
    assert plan.config.optimizer == "adamw" and plan.config.lr == 1e-3  # the flags' recipe, not the config's training:
    assert plan.info.segmenting == {"rule": "msst", "chunk_size": CHUNK, "num_overlap": 2, "batch_size": 1}
    assert plan.info.flags["model_config"] == str(config.resolve())
    # without a config: chunks of the training excerpt, MSST's overlap
    mel = prepare(TrainConfig(cache=toy_cache, valid=None, output=tmp_path / "mel", model="melroformer", seq_dur=0.25,
                              model_args={"dim": 8, "depth": 1, "heads": 1, "dim_head": 8, "num_bands": 4, "stft_n_fft": 256,
                                          "stft_hop_length": 64, "stft_win_length": 256, "flash_attn": False}, **FAST))
    assert isinstance(mel.model, MelBandRoformer)
    assert mel.info.segmenting == {"rule": "msst", "chunk_size": round(0.25 * RATE), "num_overlap": 4, "batch_size": 1}
    umx = prepare(TrainConfig(cache=toy_cache, valid=None, output=tmp_path / "umx", hidden_size=8, **FAST))
    assert umx.info.segmenting is None


def test_config_errors_are_one_line(toy_cache, tmp_path, config, run_cli):
    other = write_config(tmp_path, "8k.yaml", rate=8000)
    r = run_cli("train", toy_cache, "-o", tmp_path / "a", "--model-config", other)
    assert error_line(r) == (f"umxtools: error: {other.resolve()}: audio: sample_rate is 8000 Hz but the cache {toy_cache} holds "
                             f"{RATE} Hz audio; use a cache of the config's rate or another config")
    r = run_cli("train", toy_cache, "-o", tmp_path / "b", "--model-config", config, "--model", "waveform")
    assert error_line(r) == (f"umxtools: error: --model waveform conflicts with --model-config {config}, a bs_roformer model "
                             "(--model bsroformer); drop --model")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    r = run_cli("train", toy_cache, "-o", tmp_path / "c", "--model-config", bad)
    assert error_line(r).startswith(f"umxtools: error: {bad.resolve()}: not a readable YAML config (")
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    path = tmp_path_factory.mktemp("songs") / "song.wav"
    sf.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, (int(1.3 * RATE) + 7, 2)).astype("float32"), RATE, subtype="FLOAT")
    return path


def test_trained_roformer_separates_by_msst_rule_and_resumes(toy_cache, tmp_path, config, song, run_cli):
    out = tmp_path / "split"
    args = ("train", toy_cache, "-o", out, "--model-config", config, "--targets", "vocals", "--epochs", "2", *CLI_FAST)
    r = run_cli(*args, "--time-limit", "1e-6")  # stops after epoch 1
    assert r.code == 0, r.err
    meta = json.loads((out / "model.json").read_text())
    assert meta["segmenting"] == {"rule": "msst", "chunk_size": CHUNK, "num_overlap": 2, "batch_size": 1}
    assert meta["class"] == MODELS["bsroformer"] and meta["targets"] == ["vocals"]
    assert meta["training"]["args"]["model_config"] == str(config.resolve()) and meta["training"]["epochs_trained"] == 1

    r = run_cli("separate", song, "--model", out, "-o", tmp_path / "est", "-q")
    assert r.code == 0, r.err
    audio, _ = sf.read(song, dtype="float32", always_2d=True)
    module = load_model(out).module
    with torch.no_grad():
        ref = msst_demix(module, torch.from_numpy(audio.T), CHUNK, 2, 1).numpy()[0]  # (channels, samples)
    est, _ = sf.read(tmp_path / "est" / "song" / "vocals.wav", dtype="float32", always_2d=True)
    assert est.T.shape == ref.shape and np.abs(ref).max() > 0 and np.abs(est.T - ref).max() <= 1e-6

    # the same command resumed continues the run (its first epoch kept), as a run of 2 epochs in one go
    first = load_checkpoint(out / "model.chkpnt")["history"][0]
    r = run_cli(*args, "--resume")
    assert r.code == 0, r.err
    history = load_checkpoint(out / "model.chkpnt")["history"]
    assert len(history) == 2 and history[0] == first
    whole = tmp_path / "whole"
    r = run_cli("train", toy_cache, "-o", whole, "--model-config", config, "--targets", "vocals", "--epochs", "2", *CLI_FAST)
    assert r.code == 0, r.err
    a, b = (torch.load(f / "model.pth", weights_only=True) for f in (out, whole))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
