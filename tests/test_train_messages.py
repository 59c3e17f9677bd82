"""umxtools train says what it did when that is nothing or not what was asked, and its errors name
the real cause (issue 14): training without --valid, a resume with too few --epochs, a damaged
validation cache behind a NaN loss, excerpts longer than the tracks. Each test is the accident."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import error_line
from umxtools.cache import CacheOptions, build_cache
from umxtools.checkpoints import load_checkpoint
from umxtools.datasets import MUSDB_SOURCES, musdb_tracks
from umxtools.models.loading import load_model
from umxtools.toy import make_toy_dataset

TINY = ("--hidden-size", "16", "--seq-dur", "1", "--samples-per-track", "2", "--batch-size", "4", "--epochs", "2")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --- no --valid ----------------------------------------------------------------------------------


def test_without_valid_the_last_epochs_weights_are_kept_and_recorded(run_cli, toy_cache, tmp_path):
    """--valid was required, so a quick experiment needed a validation cache it did not want."""
    out = tmp_path / "m"
    r = run_cli("train", toy_cache, "-o", out, *TINY, "-q")
    assert (r.code, r.out) == (0, f"{out}\n"), r.err
    # -q silences progress, not the one line that says the run differs from open-unmix's
    assert _lines(r.err) == [f"umxtools: note: {out}: no --valid: no validation; the weights kept are the last epoch's, the learning "
                             "rate decays when the training loss stops falling, and there is no early stopping (--epochs or "
                             "--time-limit end the run)"]
    state = load_checkpoint(out / "vocals.chkpnt")
    weights = torch.load(out / "vocals.pth", weights_only=True)
    assert state["epochs_trained"] == 2 and state["best_epoch"] == 2 and state["best_loss"] is None
    assert weights.keys() == state["state_dict"].keys() and all(torch.equal(weights[k], state["state_dict"][k]) for k in weights)

    meta = json.loads((out / "vocals.json").read_text())
    assert (meta["valid_cache"], meta["args"]["valid"], meta["weights_kept"]) == (None, None, "last_epoch")
    assert (meta["best_epoch"], meta["best_loss"], meta["valid_loss_history"]) == (2, None, [])
    assert len(meta["train_loss_history"]) == 2 and all(np.isfinite(meta["train_loss_history"]))
    rows = list(csv.DictReader(open(out / "vocals.history.csv")))
    assert [(r["valid_loss"], r["best"]) for r in rows] == [("", "1"), ("", "1")]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    model = load_model(out)  # what `umxtools separate` loads
    loaded = model.umx["vocals"].state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)

    # a resume must not quietly start validating a run that never did (or stop)
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *TINY, "--resume", "--epochs", "3", "-q")
    assert error_line(r).startswith(f"umxtools: error: {out / 'vocals.chkpnt'}: a checkpoint of another run: valid is null there, ")


# --- resuming with --epochs not above what is trained --------------------------------------------


def test_resume_with_fewer_epochs_fails_and_with_as_many_says_nothing_to_do(run_cli, toy_cache, tmp_path):
    """`train --resume --epochs 2` after 4 epochs printed `epochs 5..2` and exited 0."""
    out = tmp_path / "m"
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *TINY, "-q")
    assert r.code == 0, r.err
    before = _files(out)
    chkpnt = out / "vocals.chkpnt"

    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *TINY, "--resume", "--epochs", "1")
    assert error_line(r) == (f"umxtools: error: {chkpnt}: already trained 2 epochs; --epochs 1 is fewer, so nothing was done "
                             "(raise --epochs above 2 to continue, or --force to start over)")
    assert _files(out) == before

    # as many: what a requeued job or a rerun pipeline asks; it is done, so success, and it says so
    for quiet in ((), ("-q",)):
        r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *TINY, "--resume", *quiet)
        assert (r.code, r.out) == (0, f"{out}\n")
        assert _lines(r.err) == [f"umxtools: note: {chkpnt}: already trained 2 epochs (--epochs 2): nothing to do "
                                 "(raise --epochs to train longer)"]
        assert _files(out) == before

    # killed after the last checkpoint but before its metadata: the requeued job repairs, and says so
    (out / "vocals.json").unlink()
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *TINY, "--resume", "-q")
    assert r.code == 0 and _lines(r.err) == [f"umxtools: note: {chkpnt}: already trained 2 epochs (--epochs 2): nothing to do "
                                             "(raise --epochs to train longer); the files derived from the checkpoint were rewritten"]
    assert json.loads((out / "vocals.json").read_text())["epochs_trained"] == 2


# --- a NaN validation loss: the data or the model ---------------------------------------------------


NAN_IN_EVAL = '''
import torch
from torch import nn


class NaNInEval(nn.Module):
    """Trains like a gain; its output on validation is NaN, as a diverged model's."""

    kind = "spectrogram"

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.gain * (1.0 if self.training else float("nan"))
'''


def test_a_nan_validation_loss_names_the_damaged_valid_cache_or_else_the_model(run_cli, toy_cache, tmp_path):
    """A NaN in the validation cache was reported as `validation loss is nan` about the model folder."""
    valid = tmp_path / "valid.h5"
    shutil.copy(toy_cache, valid)
    with h5py.File(valid, "r+") as f:  # a flipped value in the stored data; the HDF5 structure is intact
        data = f["tracks/00001/stft/mixture"]
        values = data[10]
        values[0, 0, 100] = np.nan
        data[10] = values
    out = tmp_path / "m"
    r = run_cli("train", toy_cache, "--valid", valid, "-o", out, *TINY, "-q")
    assert error_line(r) == (f"umxtools: error: {valid}: validation loss is nan in epoch 1: the validation cache is damaged "
                             f"(track 'toy_001' stft/mixture: checksum mismatch); run umxtools cache check {valid}, and rebuild "
                             "it; stopped, nothing was written")
    assert not out.exists()

    # the same NaN from the model, with an intact validation cache: the model and its learning rate
    model = tmp_path / "nan_in_eval.py"
    model.write_text(NAN_IN_EVAL)
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *TINY, "--model", f"{model}:NaNInEval", "--lr", "0.01", "-q")
    line = error_line(r)
    assert line.startswith(f"umxtools: error: {out}: validation loss is nan in epoch 1 (training loss ") and line.endswith(
        ") and the validation cache is intact: the model diverged; stopped, nothing was written; lower --lr (now 0.01)"), line


# --- excerpts and tracks ---------------------------------------------------------------------------


def test_excerpts_longer_than_every_track_name_the_flag_and_the_lengths(run_cli, toy_cache, tmp_path):
    """`no track is at least 9.0 s long (387 frames)` did not say which flag sets 9 s."""
    out = tmp_path / "m"
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *TINY, "--seq-dur", "9")
    assert error_line(r) == (f"umxtools: error: {toy_cache}: every track is shorter than --seq-dur 9 s (the longest, 'toy_000', is "
                             "8.00 s); lower --seq-dur")
    r = run_cli("train", toy_cache, "--valid", toy_cache, "-o", out, *TINY, "--valid-seq-dur", "8.5")
    assert error_line(r) == (f"umxtools: error: {toy_cache}: every track is shorter than --valid-seq-dur 8.5 s (the longest, "
                             "'toy_000', is 8.00 s); lower --valid-seq-dur")
    assert not out.exists()


def test_tracks_too_short_to_sample_are_named_at_the_start(run_cli, tmp_path):
    """Tracks shorter than --seq-dur were silently never trained on."""
    root = tmp_path / "data"
    make_toy_dataset(root, tracks=2, seconds=2.0, seed=3, test_tracks=0)
    for wav in (root / "train" / "toy_001").glob("*.wav"):  # toy_001: 1 s
        audio, rate = sf.read(wav, dtype="float32")
        sf.write(wav, audio[:rate], rate, subtype="FLOAT")
    cache = build_cache(musdb_tracks(root, is_wav=True, subsets="train", split=None), tmp_path / "c.h5", list(MUSDB_SOURCES),
                        CacheOptions(waveforms=False), meta={"kind": "musdb", "additive": True})
    r = run_cli("train", cache, "-o", tmp_path / "m", *TINY, "--seq-dur", "1.5", "--epochs", "1", "-q")
    assert r.code == 0, r.err
    assert _lines(r.err)[1] == (f"umxtools: note: {cache}: 1 of 2 tracks are shorter than --seq-dur 1.5 s and are never sampled "
                                "('toy_001')")
