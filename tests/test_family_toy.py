"""Each of today's families learns the toy: a small CPU configuration, trained for a minute from a
cache, beats the mixture by at least 3 dB of median vocals SDR on held-out toy tracks.

The SDR is museval's (``umxtools eval``: BSSEval v4 framewise, the median over frames of each
track, then the median over tracks) of the vocals estimate, scored with its residual as the
accompaniment (``separate --residual``), against the mixture given as the vocals estimate
(``oracle --method mix``) on the same tracks. This is the reduced setting of the table in
docs/models.md (``bench/bench_models.py --part sdr`` trains the same families longer).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from umxtools import cli
from umxtools.cache import CacheOptions, build_cache
from umxtools.datasets import MUSDB_SOURCES, musdb_tracks
from umxtools.toy import make_toy_dataset
from umxtools.training import TrainConfig, train

pytest.importorskip("demucs.htdemucs", reason="HTDemucs is demucs's class: pip install 'umxtools[htdemucs]'")

MARGIN_DB = 3.0
SCORED = "vocals,accompaniment"
# the reduced setting: 2 s stereo excerpts in batches of 4, vocals only, the waveform L1 at a
# constant learning rate of 5e-3 after 10 warm-up steps (a cosine decay over so few steps
# learns less), no validation (the last weights are kept). REDUCED[family]: the family's small
# size (the RoFormers with few, wide bands: fewer positions for the transformer) and its epochs
# of 10 batches. Measured on 2 cores: about 50 s of training each.
COMMON = {"targets": ("vocals",), "seq_dur": 2.0, "batch_size": 4, "samples_per_track": 2, "lr": 5e-3, "warmup_steps": 10,
          "lr_schedule": "plateau", "loss": "l1", "seed": 0}
ROFORMER = {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16}
WIDE_BANDS = (8,) * 8 + (24,) * 8 + (96,) * 4 + (385,)  # 21 bands over the 1025 bins of a 2048-point STFT
REDUCED: dict[str, dict] = {
    "bsroformer": {"model_args": {**ROFORMER, "freqs_per_bands": list(WIDE_BANDS)}, "epochs": 6},
    "melroformer": {"model_args": {**ROFORMER, "num_bands": 16}, "epochs": 6},
    "htdemucs": {"model_args": {"segment": 2, "demucs_args": {"channels": 16, "t_layers": 1}}, "epochs": 4},
}
TRAIN_TRACKS = 20


def umx(*args) -> int:
    """``umxtools ARGS`` in this process (no capsys: the module's fixture runs commands too); the exit code."""
    argv, sys.argv = sys.argv, ["umxtools", *map(str, args)]
    try:
        cli.main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv


def median_vocals_sdr(scores: Path) -> float:
    """museval's aggregate: the median over tracks of each track's median framewise vocals SDR."""
    per_track = []
    for path in sorted((scores / "test").glob("*.json")):
        target = next(t for t in json.loads(path.read_text())["targets"] if t["name"] == "vocals")
        per_track.append(np.nanmedian([f["metrics"]["SDR"] if f["metrics"]["SDR"] is not None else np.nan for f in target["frames"]]))
    assert per_track, f"no scores in {scores}"
    return float(np.median(per_track))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """20 train tracks and 4 test tracks of 8 s, the training cache, the mixture's SDR."""
    work = tmp_path_factory.mktemp("family-toy")
    root = work / "toy"
    make_toy_dataset(root, tracks=TRAIN_TRACKS, seconds=8.0, seed=1, test_tracks=4)
    refs = musdb_tracks(root, is_wav=True, subsets="train", split=None)
    cache = build_cache(refs, work / "train.h5", list(MUSDB_SOURCES), CacheOptions(), meta={"kind": "musdb", "additive": True})
    assert umx("oracle", "--musdb", root, "--is-wav", "--method", "mix", "--targets", SCORED, "-o", work / "mix", "-q") == 0
    assert umx("eval", work / "mix", "--musdb", root, "--is-wav", "--targets", SCORED, "-o", work / "mix-scores", "-q") == 0
    return {"root": root, "work": work, "train": cache, "mixture_sdr": median_vocals_sdr(work / "mix-scores")}


@pytest.mark.parametrize("family", REDUCED)
def test_a_family_trained_on_the_toy_beats_the_mixture_by_3_db(toy, family):
    work = toy["work"]
    folder = work / family
    train(TrainConfig(cache=toy["train"], valid=None, output=folder, model=family, **COMMON, **REDUCED[family]))
    assert umx("separate", toy["root"] / "test", "--model", folder, "--targets", "vocals", "--residual",
               "-o", work / f"{family}-est" / "test", "-q") == 0
    assert umx("eval", work / f"{family}-est", "--musdb", toy["root"], "--is-wav", "--targets", SCORED,
               "-o", work / f"{family}-scores", "-q") == 0
    sdr = median_vocals_sdr(work / f"{family}-scores")
    assert sdr >= toy["mixture_sdr"] + MARGIN_DB, f"{family}: {sdr:.2f} dB, mixture {toy['mixture_sdr']:.2f} dB"
