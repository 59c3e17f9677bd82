"""umxtools.model_folder: what it writes reads back, and what it cannot read is one line.

The write side is checked key by key against docs/model-format.md by test_train_model_format.py;
here the files are written without training (a made-up run of two epochs) and read back, and
folders from a newer umxtools, garbled files and missing keys are refused naming file and key.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import error_line
from umxtools import model_folder as mf
from umxtools.checkpoints import rng_state
from umxtools.errors import CheckpointError, ModelError
from umxtools.models import JOINT, OpenUnmix
from umxtools.models.loading import load_model

TARGETS = ["vocals", "drums"]
ARGS = {"targets": TARGETS, "nb_bins": 2049, "nb_channels": 2, "max_bin": 1487, "hidden_size": 8, "nb_layers": 1,
        "unidirectional": False}


def _info(folder: Path) -> mf.RunInfo:
    files = mf.RunFiles(folder, mf.MODEL_RUN, exports=tuple(TARGETS))
    flags = {"targets": TARGETS, "nb_channels": 2, "seq_dur": 1.0, "valid_seq_dur": None, "samples_per_track": 2,
             "source_augmentations": ["gain"], "random_track_mix": True, "batch_size": 4, "lr": 1e-3, "weight_decay": 1e-5,
             "lr_decay_patience": 80, "lr_decay_gamma": 0.3, "patience": 140, "seed": 42, **mf.IDENTITY_BEFORE_RECIPE}
    cache = {"path": "/caches/train.h5", "tracks": 3, "dataset": {"kind": "musdb"}, "fingerprint": "0123456789abcdef"}
    return mf.RunInfo(files, mf.ModelSpec(JOINT, ARGS, "spectrogram"), flags, ["umxtools", "train"], 44100, 4096, 1024, 2,
                      "mse", cache, None)


def _progress() -> mf.Progress:
    rows = [{"epoch": e, "train_loss": 1.0 / e, "valid_loss": None, "best": True, "lr": 1e-3, "seconds": 0.5, "samples": 8,
             "samples_per_s": 16.0, "data_wait": 0.1, "train_loss_vocals": 0.6 / e, "valid_loss_vocals": None,
             "train_loss_drums": 0.4 / e, "valid_loss_drums": None} for e in (1, 2)]
    return mf.Progress(epochs_trained=2, best_epoch=2, stopped_early=False, history=rows)


def _model_json(folder: Path, **change) -> Path:
    """A joint model folder whose model.json has ``change`` applied (None removes a key)."""
    from umxtools.models.joint import OpenUnmixJoint

    folder.mkdir(parents=True, exist_ok=True)
    args = {k: v for k, v in ARGS.items() if k not in ("nb_bins", "nb_channels")}
    torch.save(OpenUnmixJoint(**args).state_dict(), folder / "model.pth")
    meta = mf.model_json(mf.ModelSpec(JOINT, args, "spectrogram"), TARGETS, "model.pth", 44100, 2, None, n_fft=4096, n_hop=1024)
    meta.update(change)
    (folder / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    return folder


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("songs") / "song.wav"
    sf.write(path, np.random.default_rng(0).uniform(-0.1, 0.1, (4410, 2)).astype("float32"), 44100, subtype="FLOAT")
    return path


# --- written, then read back ------------------------------------------------------------------


def test_metadata_written_reads_back(tmp_path):
    info, progress = _info(tmp_path), _progress()
    mf.write_metadata(info, progress, num_bad_epochs=0)
    meta = mf.read_model_json(tmp_path)
    assert meta.spec == info.spec and meta.targets == TARGETS and meta.weights == tmp_path / "model.pth"
    assert (meta.sample_rate, meta.nb_channels, meta.n_fft, meta.n_hop, meta.segmenting) == (44100, 2, 4096, 1024, None)
    raw = json.loads((tmp_path / "model.json").read_text())
    assert raw["format"] == mf.MODEL_FORMAT and raw["format_version"] == mf.MODEL_FORMAT_VERSION
    assert raw["training"]["train_loss_history"] == [1.0, 0.5] and raw["training"]["valid_loss_history"] == []
    # each exported target is open-unmix's <target>.json, with its own losses
    vocals = json.loads((tmp_path / "vocals.json").read_text())
    assert vocals["args"]["target"] == "vocals" and vocals["train_loss_history"] == [0.6, 0.3]
    assert mf.target_nfft(tmp_path, "drums") == 4096 and mf.target_nfft(tmp_path, "bass") is None
    sep = mf.read_separator(tmp_path)
    assert (sep.targets, sep.sample_rate, sep.nfft, sep.nhop, sep.nb_channels) == (TARGETS, 44100, 4096, 1024, 2)
    history = mf.read_history(tmp_path / "model.history.csv")
    assert [r["epoch"] for r in history] == [1, 2] and history[1]["train_loss_drums"] == pytest.approx(0.2)
    assert "valid_loss" not in history[0]  # an empty cell: no validation


def test_checkpoint_written_reads_back(tmp_path):
    info, progress = _info(tmp_path), _progress()
    es = {"patience": 140, "best": None, "num_bad_epochs": 0}
    payload = mf.checkpoint(info, progress, state_dict={"w": torch.ones(2)}, optimizer={"state": {}}, scheduler={"best": 1.0},
                            scaler={}, early_stopping=es, world_size=1, rng=rng_state(), optimizer_steps=4, ema={})
    mf.save_torch(info.files.checkpoint, payload)
    state = mf.load_checkpoint(info.files.checkpoint)
    assert state["epoch"] == 3 and state["epochs_trained"] == 2  # open-unmix's epoch is the next one
    back = mf.resumed(info.files.checkpoint, state)
    assert back.progress == progress and back.identity == mf.run_identity(info) and back.early_stopping == es
    assert torch.equal(back.state_dict["w"], torch.ones(2))


def test_metadata_current_sees_a_kill_between_checkpoint_and_metadata(tmp_path):
    info = _info(tmp_path)
    assert not mf.metadata_current(info.files, 2)  # nothing written yet
    mf.write_weights(info.files, {"w": torch.ones(1)}, {t: {"w": torch.ones(1)} for t in TARGETS})
    mf.write_metadata(info, _progress(), num_bad_epochs=0)
    assert mf.metadata_current(info.files, 2)
    assert not mf.metadata_current(info.files, 3)  # the checkpoint is an epoch ahead


# --- refused in one line ----------------------------------------------------------------------


def test_a_newer_model_format_is_refused(run_cli, song, tmp_path):
    folder = _model_json(tmp_path / "model", format_version=2)
    with pytest.raises(ModelError) as exc:
        load_model(folder)
    line = f"{folder / 'model.json'}: model format version 2 is newer than this umxtools reads (1); upgrade umxtools"
    assert str(exc.value) == line
    r = run_cli("separate", song, "--model", folder, "-o", tmp_path / "out")
    assert error_line(r) == f"umxtools: error: {line}"
    assert not (tmp_path / "out").exists()


def test_a_model_json_without_format_version_is_version_1(tmp_path):
    # hand-written folders (docs/models.md) leave it out
    model = load_model(_model_json(tmp_path / "model", format_version=None), identity=False)
    assert model.targets == TARGETS and model.sample_rate == 44100


@pytest.mark.parametrize("text,problem", [
    ('{"format": "umxtools.model",', "not readable JSON (Expecting property name enclosed in double quotes: line 1 column 29 (char 28))"),
    ("[1, 2]", "not a JSON object"),
])
def test_a_garbled_model_json_is_one_line(run_cli, song, tmp_path, text, problem):
    folder = _model_json(tmp_path / "model")
    (folder / "model.json").write_text(text)
    r = run_cli("separate", song, "--model", folder, "-o", tmp_path / "out")
    assert error_line(r) == f"umxtools: error: {folder / 'model.json'}: {problem}"


@pytest.mark.parametrize("change,problem", [
    ({"format_version": "1"}, "'format_version' must be a positive integer, has '1'"),
    ({"format_version": 0}, "'format_version' must be a positive integer, has 0"),
    ({"targets": None}, "needs a non-empty 'targets' list"),
    ({"sample_rate": "fast"}, "needs a positive whole 'sample_rate', has 'fast'"),
    ({"n_hop": None}, "a spectrogram model needs a positive integer 'n_hop'"),
    ({"args": [1]}, "'args' must be a JSON object of constructor arguments"),
    ({"kind": "midi"}, "kind must be one of spectrogram, waveform, has 'midi'"),
])
def test_a_missing_or_garbled_model_json_key_is_named(tmp_path, change, problem):
    folder = _model_json(tmp_path / "model", **change)
    with pytest.raises(ModelError) as exc:
        load_model(folder)
    assert str(exc.value) == f"{folder / 'model.json'}: {problem}"


@pytest.mark.parametrize("conf,problem", [
    ({"nfft": 4096, "nhop": 1024, "sample_rate": 44100.0}, "needs a positive integer 'nb_channels'"),
    ({"nfft": "4096", "nhop": 1024, "nb_channels": 2, "sample_rate": 44100.0}, "needs a positive integer 'nfft'"),
    ({"nfft": 4096, "nhop": 1024, "nb_channels": 2}, "needs a positive whole 'sample_rate', has None"),
])
def test_a_missing_or_garbled_separator_key_is_named(tmp_path, conf, problem):
    (tmp_path / "separator.json").write_text(json.dumps(conf))
    with pytest.raises(ModelError) as exc:
        load_model(tmp_path)
    assert str(exc.value) == f"{tmp_path / 'separator.json'}: {problem}"


def test_an_openunmix_folder_without_format_keys_loads(tmp_path):
    # open-unmix's own files: separator.json without targets, <target>.json without a format key
    torch.save(OpenUnmix(nb_bins=2049, nb_channels=2, hidden_size=8, nb_layers=3, max_bin=1487).state_dict(),
               tmp_path / "vocals.pth")
    (tmp_path / "vocals.json").write_text(json.dumps({"args": {"nfft": 4096, "nhop": 1024, "hidden_size": 8}, "rate": 44100.0}))
    (tmp_path / "separator.json").write_text(json.dumps({"rate": 44100.0, "nfft": 4096, "nhop": 1024, "nb_channels": 2}))
    model = load_model(tmp_path, identity=False)
    assert model.targets == ["vocals"] and model.n_fft == 4096 and model.umx["vocals"].hidden_size == 8


def test_a_newer_checkpoint_is_refused(tmp_path):
    path = tmp_path / "vocals.chkpnt"
    torch.save({"format": mf.CHECKPOINT_FORMAT, "format_version": 2}, path)
    with pytest.raises(CheckpointError) as exc:
        mf.load_checkpoint(path)
    assert str(exc.value) == f"{path}: checkpoint format version 2 is newer than this umxtools reads (1); upgrade umxtools"


@pytest.mark.parametrize("key", ["optimizer", "history", "epochs_trained", "rng"])
def test_a_checkpoint_without_an_entry_names_it(tmp_path, key):
    info = _info(tmp_path)
    es = {"patience": 140, "best": None, "num_bad_epochs": 0}
    state = mf.checkpoint(info, _progress(), state_dict={}, optimizer={}, scheduler={}, scaler={}, early_stopping=es,
                          world_size=1, rng=rng_state(), optimizer_steps=0, ema={})
    del state[key]
    with pytest.raises(CheckpointError) as exc:
        mf.resumed(info.files.checkpoint, state)
    assert str(exc.value) == f"{info.files.checkpoint}: its {key!r} entry is missing or garbled; pass --force to start over"
