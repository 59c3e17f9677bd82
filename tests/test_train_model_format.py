"""docs/model-format.md lists every key a training run writes, and nothing it no longer writes.

The documented keys (the tables after ``<!-- keys: NAME -->`` comments) are compared with what a
tiny single-target run, the same run without --valid, and a tiny joint run write: a key added to
a file without its line in the documentation fails here, and so does a documented key that is gone.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from umxtools.checkpoints import load_checkpoint
from umxtools.training import TrainConfig, train

DOC = Path(__file__).resolve().parents[1] / "docs" / "model-format.md"
TINY = {"hidden_size": 16, "seq_dur": 1.0, "samples_per_track": 2, "batch_size": 4, "epochs": 1}
# checkpoint entries whose own keys the documentation lists (the others are torch's or numpy's)
NESTED = ("early_stopping", "model", "rng", "rng.numpy")


def documented() -> dict[str, set[str]]:
    """``{table name: keys}`` of every ``<!-- keys: NAME -->`` table in docs/model-format.md."""
    tables: dict[str, set[str]] = {}
    name = None
    for line in DOC.read_text().splitlines():
        marker = re.fullmatch(r"<!-- keys: (.+) -->", line.strip())
        if marker:
            name = marker.group(1)
            tables[name] = set()
        elif name is not None and line.startswith("|"):
            key = re.match(r"\| `([^`]+)` \|", line)
            if key:  # the header and separator rows have no backticked key
                tables[name].add(key.group(1))
        elif name is not None and tables[name]:
            name = None  # the table ended
    return tables


def _flatten(state: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in state.items():
        key = f"{prefix}{k}"
        keys.add(key)
        if key in NESTED and isinstance(v, dict):
            keys |= _flatten(v, f"{key}.")
    return keys


def _generic(keys, targets: list[str]) -> set[str]:
    """Per-target and per-argument keys as the documentation writes them."""
    out = set()
    for k in keys:
        for t in targets:
            k = re.sub(rf"^(train|valid)_loss_{re.escape(t)}$", r"\1_loss_<target>", k)
        out.add(re.sub(r"^model\.\w+$", "model.<arg>", k))
    return out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs(toy_cache, tmp_path_factory) -> dict[str, Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("format")
    folders = {"single": root / "single", "novalid": root / "novalid", "joint": root / "joint"}
    train(TrainConfig(cache=toy_cache, valid=toy_cache, output=folders["single"], **TINY))
    train(TrainConfig(cache=toy_cache, valid=None, output=folders["novalid"], **TINY))
    train(TrainConfig(cache=toy_cache, valid=toy_cache, output=folders["joint"], targets=("vocals", "drums"), joint=True, **TINY))
    torch.set_num_threads(threads)
    return folders


def test_every_documented_table_is_found():
    assert set(documented()) == {"separator.json", "target.json", "args", "target.json args", "cache identity", "model.json",
                                 "model.json training", "checkpoint", "checkpoint identity", "history.csv"}


@pytest.mark.parametrize("run,target", [("single", "vocals"), ("novalid", "vocals"), ("joint", "drums")])
def test_separator_and_target_json_keys_are_documented(runs, run, target):
    doc, folder = documented(), runs[run]
    assert set(json.loads((folder / "separator.json").read_text())) == doc["separator.json"]
    meta = json.loads((folder / f"{target}.json").read_text())
    assert set(meta) == doc["target.json"]
    assert set(meta["args"]) == doc["args"] | doc["target.json args"]
    assert set(meta["cache"]) == doc["cache identity"]
    assert meta["valid_cache"] is None if run == "novalid" else set(meta["valid_cache"]) == doc["cache identity"]


def test_model_json_keys_are_documented(runs):
    doc = documented()
    meta = json.loads((runs["joint"] / "model.json").read_text())
    assert set(meta) == doc["model.json"]
    assert set(meta["training"]) == doc["model.json training"]
    assert set(meta["training"]["args"]) == doc["args"]
    assert set(meta["cache"]) == set(meta["valid_cache"]) == doc["cache identity"]


@pytest.mark.parametrize("run,name", [("single", "vocals"), ("novalid", "vocals"), ("joint", "model")])
def test_checkpoint_and_history_keys_are_documented(runs, run, name):
    doc, folder = documented(), runs[run]
    targets = ["vocals", "drums"] if run == "joint" else ["vocals"]
    state = load_checkpoint(folder / f"{name}.chkpnt")
    cuda_only = set() if "cuda" in state["rng"] else {"rng.cuda"}
    assert _flatten(state) == doc["checkpoint"] - cuda_only
    assert _generic(state["identity"], targets) == doc["checkpoint identity"]
    with open(folder / f"{name}.history.csv", newline="") as f:
        columns = next(csv.reader(f))
    per_target = {"train_loss_<target>", "valid_loss_<target>"} if run != "joint" else set()
    assert _generic(columns, targets) == doc["history.csv"] - per_target
    assert _generic(state["history"][0], targets) == doc["history.csv"] - per_target
