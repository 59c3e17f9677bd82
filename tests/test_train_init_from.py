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


# --- from a demucs package and an MSST checkpoint ----------------------------------------------------


def _assert_started_from(plan, state: dict, names) -> None:
    own = plan.model.state_dict()
    assert names and all(torch.equal(own[k], state[k]) for k in names)


def test_init_from_a_demucs_package(toy_cache, tmp_path):
    pytest.importorskip("demucs.states")
    from tests.test_htdemucs import save_package
    from tests.test_segments import SOURCES, TINY
    from umxtools.init_weights import source_state
    from umxtools.models.htdemucs import HTDemucs

    torch.manual_seed(3)
    th = save_package(HTDemucs(SOURCES, sample_rate=44100, segment=1, demucs_args=TINY).demucs, tmp_path / "tiny.th")
    state = source_state(str(th), SOURCES, joint=False)  # the package's weights (stored in half precision)
    flags = {"model": "htdemucs", "model_args": {"segment": 1, "demucs_args": TINY}, "seq_dur": 1.0, "init_from": str(th)}
    plan = prepare(TrainConfig(cache=toy_cache, valid=None, output=tmp_path / "all", targets=tuple(SOURCES), **flags))
    assert set(plan.model.state_dict()) == set(state)
    _assert_started_from(plan, state, list(state))
    assert f"{len(state)} loaded; 0 missing; 0 unexpected; 0 mismatched" in plan.init_note

    # one target of four: the layers that make the sources do not fit and are named; the rest loads
    plan = prepare(TrainConfig(cache=toy_cache, valid=None, output=tmp_path / "one", targets=("vocals",), **flags))
    own = plan.model.state_dict()
    mismatched = [k for k in state if own[k].shape != state[k].shape]
    assert mismatched and all(k.startswith(("demucs.decoder.", "demucs.tdecoder.")) for k in mismatched)
    _assert_started_from(plan, state, [k for k in state if k not in mismatched])
    assert f"{len(state) - len(mismatched)} loaded; 0 missing; 0 unexpected; {len(mismatched)} mismatched ({mismatched[0]}, " \
        in plan.init_note


def test_init_from_an_msst_checkpoint_with_its_config(toy_cache, tmp_path):
    from tests.test_roformer import randomize
    from tests.test_train_model_config import write_config
    from umxtools.msst import build_msst_model

    config = write_config(tmp_path)
    source = build_msst_model(config)
    randomize(source, seed=4)
    state = source.state_dict()
    ckpt = tmp_path / "model.ckpt"  # as Lightning writes it: wrapped, every key under "model."
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, ckpt)
    plan = prepare(TrainConfig(cache=toy_cache, valid=None, output=tmp_path / "out", model_config=str(config), init_from=str(ckpt),
                               epochs=1))
    assert set(plan.model.state_dict()) == set(state)
    _assert_started_from(plan, state, list(state))
    assert f"{len(state)} loaded; 0 missing; 0 unexpected; 0 mismatched" in plan.init_note


def test_an_msst_checkpoint_gives_each_target_its_own_mask_estimator(toy_cache, tmp_path):
    """MSST numbers the mask estimators in its instruments' order: fine-tuning a (vocals, other)
    checkpoint for other alone starts from other's estimator, not from the first one."""
    from tests.test_roformer import randomize
    from tests.test_train_model_config import write_config
    from umxtools.msst import build_msst_model

    config = write_config(tmp_path)  # instruments: vocals, other
    source = build_msst_model(config)
    randomize(source, seed=4)
    state = source.state_dict()
    ckpt = tmp_path / "model.ckpt"
    torch.save(state, ckpt)
    plan = prepare(TrainConfig(cache=toy_cache, valid=None, output=tmp_path / "out", model_config=str(config), init_from=str(ckpt),
                               targets=("other",), epochs=1))
    own = plan.model.state_dict()
    estimator = [k for k in state if k.startswith("mask_estimators.1.")]
    assert estimator and all(torch.equal(own[k.replace(".1.", ".0.", 1)], state[k]) for k in estimator)
    shared = [k for k in state if not k.startswith("mask_estimators.")]
    assert all(torch.equal(own[k], state[k]) for k in shared)
    assert f"{len(shared) + len(estimator)} loaded; 0 missing; {len(estimator)} unexpected (mask_estimators.vocals." in plan.init_note
