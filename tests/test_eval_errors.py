"""Bad input to umxtools eval: one clear line each; per-track problems do not cost other tracks."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import museval
import numpy as np
import pytest
import simplejson
import soundfile as sf

from tests.conftest import error_line
from umxtools.evaluation import to_json
from umxtools.report import load_method, per_track
from umxtools.toy import make_toy_dataset

TARGETS = ("vocals", "accompaniment")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """toy_000 (train) and toy_001, toy_002 (test), 2 s each."""
    root = tmp_path_factory.mktemp("errtoy")
    make_toy_dataset(root, tracks=1, seconds=2.0, seed=5, test_tracks=2)
    return root


def _references(toy: Path, folder: Path, names: list[str]) -> Path:
    """A folder of reference tracks, each a copy of toy_001."""
    for name in names:
        shutil.copytree(toy / "test" / "toy_001", folder / name)
    return folder


def _estimates(refs: Path, out: Path, name: str, seed: int = 0) -> Path:
    """Noisy copies of the references: vocals.wav and accompaniment.wav."""
    rng = np.random.default_rng(seed)
    folder = out / name
    folder.mkdir(parents=True)
    sources = {s: sf.read(refs / name / f"{s}.wav", always_2d=True)[0] for s in ("vocals", "drums", "bass", "other")}
    truth = {"vocals": sources["vocals"], "accompaniment": sources["drums"] + sources["bass"] + sources["other"]}
    for target, audio in truth.items():
        sf.write(folder / f"{target}.wav", (audio + 0.01 * rng.standard_normal(audio.shape)).astype(np.float32), 44100, subtype="FLOAT")
    return folder


def test_per_track_errors_keep_the_other_tracks(toy, tmp_path, run_cli):
    names = ["good", "missing", "rate", "nan", "mono", "silent_est", "silent_ref"]
    refs = _references(toy, tmp_path / "refs", names)
    sf.write(refs / "silent_ref" / "vocals.wav", np.zeros((88200, 2), np.float32), 44100, subtype="FLOAT")
    est = tmp_path / "est"
    for name in names:
        _estimates(refs, est, name)
    (est / "missing" / "accompaniment.wav").unlink()
    audio = sf.read(est / "rate" / "vocals.wav", always_2d=True)[0]
    sf.write(est / "rate" / "vocals.wav", audio, 22050, subtype="FLOAT")
    audio[100, 0] = np.nan
    sf.write(est / "nan" / "vocals.wav", audio, 44100, subtype="FLOAT")
    sf.write(est / "mono" / "vocals.wav", np.full((88200, 1), 0.1), 44100, subtype="FLOAT")
    sf.write(est / "silent_est" / "accompaniment.wav", np.zeros((88200, 2)), 44100, subtype="FLOAT")
    shutil.copytree(est / "good", est / "not_a_track")

    scores = tmp_path / "scores"
    result = run_cli("eval", est, "--references", refs, "-o", scores)
    assert result.code == 1
    assert result.out.strip() == str(scores)  # what was scored is there
    lines = sorted(line for line in result.err.splitlines() if line.strip())
    e = f"umxtools: error: {est}"
    assert lines == sorted([
        f"{e}/missing/accompaniment.wav: missing estimate for target 'accompaniment' (every scored track needs vocals.wav, accompaniment.wav)",
        f"{e}/rate/vocals.wav: sample rate 22050 Hz, the references are 44100 Hz (resample the estimates)",
        f"{e}/nan/vocals.wav: contains NaN or infinite samples",
        f"{e}/mono/vocals.wav: 1 channel(s), the reference has 2",
        f"{e}/silent_est/accompaniment.wav: silent over the whole track (all zeros); BSSEval v4 cannot score it (museval refuses silent estimates)",
        f"umxtools: error: {refs}/silent_ref: reference 'vocals' is silent over the whole track; BSSEval v4 cannot score it (museval "
        "refuses silent sources): leave the target out with --targets",
        f"{e}/not_a_track: no track 'not_a_track' in the references ({refs})",
    ])
    assert sorted(p.name for p in scores.iterdir()) == ["good.json"]


def test_silent_reference_frames_are_nan_and_aggregate_like_museval(toy, tmp_path):
    """museval gives NaN for a frame where a reference is silent; aggregates skip NaN as EvalStore does."""
    from umxtools.evaluation import evaluate_estimates
    from umxtools.references import FolderReferences

    refs = _references(toy, tmp_path / "refs", ["gap"])
    vocals = sf.read(refs / "gap" / "vocals.wav", always_2d=True)[0]
    vocals[44100:] = 0  # the second 1 s frame of vocals is digital silence
    sf.write(refs / "gap" / "vocals.wav", vocals, 44100, subtype="FLOAT")
    _estimates(refs, tmp_path / "est", "gap")
    summary = evaluate_estimates(tmp_path / "est", FolderReferences(str(refs)), tmp_path / "scores")
    assert summary.scored == ["gap"], summary.failed
    doc = simplejson.loads((tmp_path / "scores" / "gap.json").read_text(), allow_nan=True)
    for target in doc["targets"]:
        first, second = (f["metrics"] for f in target["frames"])
        assert all(math.isfinite(v) for v in first.values())
        assert all(math.isnan(v) for v in second.values())  # the whole group's frame, as museval
    method = load_method(tmp_path / "scores")
    store = museval.EvalStore()
    store.add_track(museval.aggregate.json2df(doc, "gap"))
    expected = store.agg_frames_scores()
    for target in TARGETS:
        for metric in ("SDR", "SIR", "ISR", "SAR"):
            ours = per_track(method, target, metric, "median")["gap"]
            assert ours == pytest.approx(expected[("gap", target, metric)], abs=1e-12)


# --- whole-run errors ------------------------------------------------------------------------------


def test_no_estimates_folder(toy, tmp_path, run_cli):
    line = error_line(run_cli("eval", tmp_path / "nope", "--musdb", toy, "--is-wav", "-o", tmp_path / "s"))
    assert line == (f"umxtools: error: {tmp_path / 'nope' / 'test'}: no such estimates folder "
                    "(expected ESTIMATES/<subset>/<track>/<target>.wav, museval's layout); made by: umxtools separate "
                    "INPUT -o ESTIMATES/<subset> or umxtools oracle")


def test_single_target_and_unknown_target(toy, tmp_path, run_cli):
    _estimates(toy / "test", tmp_path / "est" / "test", "toy_001")
    args = ("eval", tmp_path / "est", "--musdb", toy, "--is-wav", "-o", tmp_path / "s")
    line = error_line(run_cli(*args, "--targets", "vocals"))
    assert line == ("umxtools: error: cannot score vocals alone: BSSEval v4 scores targets jointly and museval scores nothing "
                    "for a single target; score at least two targets (e.g. --targets vocals,accompaniment)")
    line = error_line(run_cli(*args, "--targets", "vocal,accompaniment"))
    assert line == ("umxtools: error: unknown target(s) vocal; the references have vocals, drums, bass, other, "
                    "accompaniment, linear_mixture")
    assert not (tmp_path / "s").exists()


def test_no_estimate_named_after_a_target(toy, tmp_path, run_cli):
    folder = tmp_path / "est" / "test" / "toy_001"
    folder.mkdir(parents=True)
    sf.write(folder / "voice.wav", np.ones((100, 2)), 44100)
    line = error_line(run_cli("eval", tmp_path / "est", "--musdb", toy, "--is-wav", "-o", tmp_path / "s"))
    assert line.startswith(f"umxtools: error: {tmp_path / 'est' / 'test'}: no estimates named after a target (vocals.wav, drums.wav")


def test_references_flags(toy, tmp_path, run_cli):
    both = run_cli("eval", tmp_path, "--musdb", toy, "--references", toy, "-o", tmp_path / "s")
    assert both.code == 2 and "give the references: --musdb ROOT or --references DIR (one of them)" in both.err
    neither = run_cli("eval", tmp_path, "-o", tmp_path / "s")
    assert neither.code == 2


def test_resume_refuses_files_scored_otherwise(toy, tmp_path, run_cli):
    """Score files of other settings, or not umxtools', are never mixed into a run: one line, exit 1."""
    _estimates(toy / "test", tmp_path / "est" / "test", "toy_001")
    scores = tmp_path / "s" / "test"
    scores.mkdir(parents=True)
    args = ("eval", tmp_path / "est", "--musdb", toy, "--is-wav", "-o", tmp_path / "s")
    other = {"targets": [], "umxtools": {"backend": "fast", "mode": "v4", "win": 1.0, "hop": 1.0, "targets": ["vocals", "drums"]}}
    (scores / "toy_001.json").write_text(to_json(other))
    line = error_line(run_cli(*args))
    assert line == (f"umxtools: error: {scores / 'toy_001.json'}: scored with targets vocals,drums, this run asks for "
                    "vocals,accompaniment: score into another folder or pass --force to rescore")
    other["umxtools"].update(backend="museval", targets=["vocals", "accompaniment"])
    (scores / "toy_001.json").write_text(to_json(other))
    line = error_line(run_cli(*args))
    assert line == (f"umxtools: error: {scores / 'toy_001.json'}: scored with backend museval, this run asks for fast: "
                    "score into another folder or pass --force to rescore")
    (scores / "toy_001.json").write_text(to_json({"targets": [], "museval_version": "0.4.1"}))
    line = error_line(run_cli(*args))
    assert line == (f"umxtools: error: {scores / 'toy_001.json'}: not written by umxtools eval (no 'umxtools' block), its "
                    "settings are unknown: score into another folder or pass --force to rescore")
