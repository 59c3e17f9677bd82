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
from umxtools import fileio
from umxtools.evaluation import to_json
from umxtools.fileio import MARKER
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
    assert result.out == ""  # stdout names the scores folder only when every track of the run has its scores
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
    assert sorted(p.name for p in scores.iterdir()) == [MARKER, "good.json"]


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
    fileio.claim_folder(tmp_path / "s", "eval")  # a scores folder of an earlier eval run
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


# --- safe by construction: where scores may be written --------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("where", "what"), [("is", "estimates folder"), ("inside", "estimates folder"),
                                             ("around", "estimates folder"), ("inside", "references"),
                                             ("is", "references")])
def test_scores_never_land_in_the_estimates_or_the_references(toy, tmp_path, run_cli, where, what):
    refs = _references(toy, tmp_path / "data" / "refs", ["t1"])
    est = tmp_path / "work" / "est"
    _estimates(refs, est, "t1")
    inp = est if what == "estimates folder" else refs
    out = {"is": inp, "inside": inp / "t1" / "scores", "around": inp.parent}[where]
    before = _files(tmp_path)
    line = error_line(run_cli("eval", est, "--references", refs, "-o", out, "--force"))
    relation = {"is": "is", "inside": "lies inside", "around": "contains"}[where]
    assert line == f"umxtools: error: {out}: {relation} the {what} {inp}; write the output somewhere else (-o)"
    assert _files(tmp_path) == before


def test_eval_writes_only_into_its_own_scores_folder(toy, tmp_path, run_cli):
    """A folder eval did not make (museval's own scores, a dataset, a report) is refused with
    --force too; a rerun into its own folder (with make's .complete in it) resumes."""
    refs = _references(toy, tmp_path / "refs", ["t1"])
    est = tmp_path / "est"
    _estimates(refs, est, "t1")
    museval_scores = tmp_path / "museval-scores"
    museval_scores.mkdir()
    (museval_scores / "t1.json").write_text('{"targets": []}')
    for flags in ((), ("--force",)):
        line = error_line(run_cli("eval", est, "--references", refs, "-o", museval_scores, *flags))
        assert line == (f"umxtools: error: {museval_scores}: holds files that 'umxtools eval' did not make (t1.json, ...); "
                        "choose an empty or new folder (-o)")
    assert _files(museval_scores) == {"t1.json": b'{"targets": []}'}

    scores = tmp_path / "scores"
    assert run_cli("eval", est, "--references", refs, "-o", scores, "-q").code == 0
    (scores / ".complete").touch()
    rerun = run_cli("eval", est, "--references", refs, "-o", scores)
    assert rerun.code == 0, rerun.err
    assert "scored 0 track(s) (0.0 s of audio), 1 already scored" in rerun.err


def test_track_and_target_names_become_paths_only_when_plain(toy, tmp_path, run_cli):
    """A track folder whose name holds a control character cannot name a score file; the other
    tracks are scored. --targets names never become file names unchecked."""
    refs = _references(toy, tmp_path / "refs", ["t1", "bad\nname"])
    est = tmp_path / "est"
    for name in ("t1", "bad\nname"):
        _estimates(refs, est, name)
    scores = tmp_path / "scores"
    result = run_cli("eval", est, "--references", refs, "-o", scores, "-q")
    assert result.code == 1
    assert result.err.splitlines() == [(f"umxtools: error: {est}: track 'bad\\nname' contains a control character; "
                                        "it must be a plain file name")]
    assert sorted(p.name for p in scores.iterdir()) == [MARKER, "t1.json"]
    line = error_line(run_cli("eval", est, "--references", refs, "-o", tmp_path / "s2", "--targets", "vocals,../../accompaniment"))
    assert line == "umxtools: error: target '../../accompaniment' contains a path separator; it must be a plain file name"
    assert not (tmp_path / "s2").exists()


def test_output_problems_are_one_line_before_any_track_is_scored(toy, tmp_path, run_cli, monkeypatch):
    from umxtools import evaluation

    refs = _references(toy, tmp_path / "refs", ["t1", "t2"])
    est = tmp_path / "est"
    for name in ("t1", "t2"):
        _estimates(refs, est, name)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    scored = []
    real_score = evaluation.score_track
    monkeypatch.setattr(evaluation, "score_track", lambda *a, **k: scored.append(a[1]) or real_score(*a, **k))
    line = error_line(run_cli("eval", est, "--references", refs, "-o", blocker / "scores"))
    assert line == f"umxtools: error: {blocker / 'scores'}: a part of the path is a file, not a folder"
    assert scored == []

    # the disk fills up after the first score file: one line, the first file kept, no partial one
    real_write = Path.write_bytes

    def full(self, data):
        if data and self.name.startswith(".t2.json"):
            raise OSError(28, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    scores = tmp_path / "scores"
    line = error_line(run_cli("eval", est, "--references", refs, "-o", scores))
    assert line == f"umxtools: error: {scores / 't2.json'}: no space left on device"
    assert sorted(p.name for p in scores.iterdir()) == [MARKER, "t1.json"]


def test_two_runs_on_one_track_never_mix_settings(toy, tmp_path, monkeypatch):
    """Two eval runs into one folder, overlapping on a track: while this one scores t1, another
    run with other targets writes t1.json, then holds t2.json's lock. Neither file is overwritten;
    each is a one-line problem of its track. (Shards share a folder but never a track.)"""
    from umxtools import evaluation
    from umxtools.errors import LockedError, ScoreError
    from umxtools.references import FolderReferences

    refs = _references(toy, tmp_path / "refs", ["t1", "t2"])
    est = tmp_path / "est"
    for name in ("t1", "t2"):
        _estimates(refs, est, name)
    scores = tmp_path / "scores"
    theirs = to_json({"targets": [], "umxtools": {"backend": "fast", "mode": "v4", "win": 1.0, "hop": 1.0,
                                                  "targets": ["vocals", "drums"]}})
    real_jobs = evaluation._run_jobs

    def racing(todo, jobs):
        for track, result, seconds, notes in real_jobs(todo, jobs):
            if track == "t1":
                fileio.write_text(scores / "t1.json", theirs)
                yield track, result, seconds, notes
            else:
                with fileio.exclusive(scores / "t2.json"):
                    yield track, result, seconds, notes

    monkeypatch.setattr(evaluation, "_run_jobs", racing)
    summary = evaluation.evaluate_estimates(est, FolderReferences(str(refs)), scores)
    assert summary.scored == []
    t1, t2 = summary.failed
    assert isinstance(t1, ScoreError) and str(t1) == (
        f"{scores / 't1.json'}: another run wrote it while this one scored the track (scored with targets vocals,drums, "
        "this run asks for vocals,accompaniment); it is left as it is: score into another folder")
    assert isinstance(t2, LockedError) and str(t2).startswith(f"{scores / 't2.json'}: another umxtools process is writing it (pid ")
    assert (scores / "t1.json").read_text() == theirs and not (scores / "t2.json").exists()


def test_score_files_have_the_umask_mode(toy, tmp_path):
    """Colleagues on a shared cluster read the scores: umask 027 gives 0640, not mkstemp's 0600."""
    from tests.conftest import modes, run_with_umask

    refs = _references(toy, tmp_path / "refs", ["t1"])
    _estimates(refs, tmp_path / "est", "t1")
    result = run_with_umask(0o027, "eval", tmp_path / "est", "--references", refs, "-o", tmp_path / "scores", "-q")
    assert result.code == 0, result.err
    assert modes(tmp_path / "scores") == {MARKER: 0o640, "t1.json": 0o640}


# --- what eval refuses to score quietly ----------------------------------------------------------------


def test_a_truncated_estimate_is_scored_with_a_warning(toy, tmp_path, run_cli):
    """A writer killed midway leaves a short file; museval pads it with zeros in silence. A longer
    estimate is cut to the reference, as museval cuts it, without a warning. With --jobs 2 the
    warning comes from a worker process and must still reach the user."""
    refs = _references(toy, tmp_path / "refs", ["short", "long"])
    est = tmp_path / "est"
    for name in ("short", "long"):
        _estimates(refs, est, name)
    audio = sf.read(est / "short" / "vocals.wav", always_2d=True)[0]
    sf.write(est / "short" / "vocals.wav", audio[:66150], 44100, subtype="FLOAT")
    audio = sf.read(est / "long" / "vocals.wav", always_2d=True)[0]
    sf.write(est / "long" / "vocals.wav", np.concatenate([audio, audio[:100]]), 44100, subtype="FLOAT")
    result = run_cli("eval", est, "--references", refs, "-o", tmp_path / "scores", "--jobs", "2", "-q")
    assert (result.code, result.out.strip()) == (0, str(tmp_path / "scores")), result.err
    assert result.err.splitlines() == [
        f"umxtools: warning: {est / 'short' / 'vocals.wav'}: 66150 samples, 22050 (0.50 s) shorter than the reference; "
        "zero-padded as museval does (a truncated file? make it again)"]
    doc = simplejson.loads((tmp_path / "scores" / "long.json").read_text())
    assert doc["umxtools"]["estimate_nb_samples"]["vocals"] == 88300


def test_a_shard_with_no_track_says_so_and_writes_nothing(toy, tmp_path, run_cli):
    refs = _references(toy, tmp_path / "refs", ["t1", "t2"])
    est = tmp_path / "est"
    for name in ("t1", "t2"):
        _estimates(refs, est, name)
    result = run_cli("eval", est, "--references", refs, "-o", tmp_path / "scores", "--shard", "2/3")
    assert error_line(result) == f"umxtools: error: shard 2/3 selects none of the 2 tracks of {est}; use at most 2 shards"
    assert result.out == "" and not (tmp_path / "scores").exists()


def test_a_half_written_oracle_folder_is_not_scored(toy, tmp_path, run_cli):
    """An oracle run stopped after its first track (or an older umxtools's oracle folder with a
    track written to its middle): eval names the tracks and the fix instead of scoring a part."""
    refs = _references(toy, tmp_path / "refs", ["t1", "t2", "t3"])
    est, scores = tmp_path / "est", tmp_path / "scores"
    oracle = ("oracle", "--references", refs, "--method", "mix", "--targets", "vocals,accompaniment", "-o", est, "-q")
    assert run_cli(*oracle).code == 0
    shutil.rmtree(est / "t3")  # never written: the run was stopped before it
    (est / "t2" / "oracle.json").unlink()  # written to its middle
    result = run_cli("eval", est, "--references", refs, "-o", scores)
    assert (result.code, result.out) == (1, "")
    fix = f"finish the folder first: run the umxtools oracle command that writes {est} again (it redoes incomplete tracks)"
    assert sorted(line for line in result.err.splitlines() if line.strip()) == [
        f"umxtools: error: {est / 't2'}: incomplete oracle estimates (no oracle.json: the run writing them was stopped, or an "
        f"older umxtools wrote them); {fix}",
        f"umxtools: error: {est / 't3'}: no estimates of this track; {fix}",
    ]
    assert sorted(p.name for p in scores.glob("[!.]*")) == ["t1.json"]
    assert run_cli(*oracle).code == 0
    again = run_cli("eval", est, "--references", refs, "-o", scores)
    assert (again.code, again.out.strip()) == (0, str(scores)), again.err
    assert sorted(p.name for p in scores.glob("[!.]*")) == ["t1.json", "t2.json", "t3.json"]


def test_residual_of_a_vocals_model_is_named_in_the_single_target_error(toy, tmp_path, run_cli):
    refs = _references(toy, tmp_path / "refs", ["t1"])
    est = _estimates(refs, tmp_path / "est", "t1")
    (est / "accompaniment.wav").rename(est / "residual.wav")
    line = error_line(run_cli("eval", tmp_path / "est", "--references", refs, "-o", tmp_path / "scores"))
    assert line.endswith("; residual.wav is not a target: separate such a model again with --residual, which names it "
                         "accompaniment.wav, or rename residual.wav to accompaniment.wav")


def test_killed_writers_temporaries_are_removed_by_the_next_run(toy, tmp_path, run_cli):
    refs = _references(toy, tmp_path / "refs", ["t1"])
    _estimates(refs, tmp_path / "est", "t1")
    scores = tmp_path / "scores"
    assert run_cli("eval", tmp_path / "est", "--references", refs, "-o", scores, "-q").code == 0
    left = scores / ".t1.json.4242-0123abcd.tmp"
    left.write_text('{"targets": [')  # SIGKILL while the score file was written
    assert run_cli("eval", tmp_path / "est", "--references", refs, "-o", scores, "-q").code == 0
    assert not left.exists()
