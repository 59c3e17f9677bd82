"""--init-from: a fresh run starts from another model's weights (name and shape matches)."""

from __future__ import annotations

import json

import pytest
import torch

from umxtools.errors import UsageError
from umxtools.train_setup import prepare
from umxtools.training import TrainConfig, train

TINY = {"hidden_size": 16, "seq_dur": 1.0, "samples_per_track": 2, "batch_size": 4, "epochs": 1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def earlier(toy_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("init") / "earlier"
    train(TrainConfig(cache=toy_cache, valid=None, output=out, **TINY))
    return out


def test_init_from_a_folder_starts_from_its_weights(toy_cache, tmp_path, earlier):
    saved = torch.load(earlier / "vocals.pth", weights_only=True)
    for source in (earlier, earlier / "vocals.pth"):
        plan = prepare(TrainConfig(cache=toy_cache, valid=None, output=tmp_path / "new", seed=7, init_from=str(source), **TINY))
        start = plan.model.state_dict()
        assert set(start) == set(saved) and all(torch.equal(start[k], saved[k]) for k in saved)
        assert f"{len(saved)} loaded; 0 missing; 0 unexpected; 0 mismatched" in plan.init_note
    notes = []
    out = tmp_path / "new"
    train(TrainConfig(cache=toy_cache, valid=None, output=out, init_from=str(earlier), **TINY), lambda e, i: notes.append((e, i)))
    assert any(e == "note" and "--init-from" in i["message"] for e, i in notes)
    assert json.loads((out / "vocals.json").read_text())["args"]["init_from"] == str(earlier)


def test_a_partial_match_lists_the_mismatches(toy_cache, tmp_path, earlier):
    plan = prepare(TrainConfig(cache=toy_cache, valid=None, output=tmp_path / "new", init_from=str(earlier), **{**TINY, "hidden_size": 8}))
    note = plan.init_note
    assert "0 missing; 0 unexpected" in note and "mismatched (" in note
    mismatched = int(note.split("; ")[-1].split()[0])
    assert mismatched > 0 and "loaded" in note
    saved = torch.load(earlier / "vocals.pth", weights_only=True)
    assert torch.equal(plan.model.state_dict()["input_mean"], saved["input_mean"])  # same shape: loaded


def test_init_from_with_resume_is_refused(toy_cache, tmp_path, earlier):
    with pytest.raises(UsageError, match="--init-from starts a fresh run"):
        prepare(TrainConfig(cache=toy_cache, valid=None, output=tmp_path / "new", init_from=str(earlier), resume=True, **TINY))
