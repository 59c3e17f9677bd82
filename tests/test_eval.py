"""umxtools eval against museval itself: its regression reference, eval_mus_track and evaluate.

museval costs about 0.5 s per second of audio per target here, so the toy tracks are 2 s long
(two 1 s frames) and most runs score two targets.
"""

from __future__ import annotations

import os
from pathlib import Path

import musdb
import museval
import numpy as np
import pytest
import simplejson
import soundfile as sf

from tests.conftest import SAMPLE, need_shared
from umxtools.cache import Shard
from umxtools.evaluation import (
    USDR_DELTA,
    bsseval_groups,
    evaluate_estimates,
    fit_length,
)
from umxtools.oracle import write_oracle
from umxtools.references import FolderReferences, MusdbReferences
from umxtools.toy import make_toy_dataset

SECONDS = 2.0
RATE = 44100


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """1 train + 2 test toy tracks of 2 s: test/toy_001, test/toy_002."""
    root = tmp_path_factory.mktemp("evaltoy")
    make_toy_dataset(root, tracks=1, seconds=SECONDS, seed=3, test_tracks=2)
    return root


@pytest.fixture(scope="module")
def irm(toy, tmp_path_factory) -> Path:
    """Oracle IRM (power) estimates of the toy test tracks in museval's layout, irm/test/<track>/.

    Real separations, not noise. Made from the folder references: soundfile reads, where musdb
    would start an ffmpeg process per stream (the slowest part of these tests).
    """
    out = tmp_path_factory.mktemp("irm")
    write_oracle(FolderReferences(str(toy / "test")), "irm2", out / "test")
    return out


def _frames(doc: dict) -> dict:
    """``{target: [{metric: Decimal or float}, ...]}`` of a score document."""
    return {t["name"]: [f["metrics"] for f in t["frames"]] for t in doc["targets"]}


def _load(path: Path) -> dict:
    return simplejson.loads(path.read_text(), use_decimal=True, allow_nan=True)


# --- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [None, "museval"])
def test_sample_reproduces_museval_regression_reference(tmp_path, run_cli, backend):
    """museval's own reference scores of random estimates of the real sample, frame by frame,
    with the default (fast) backend and with museval.

    The reference stores values quantised to 1e-5 (museval's TrackStore); museval 0.4.1 and
    umxtools reproduce them exactly here. The tolerance allows one quantum, for a BLAS or FFT
    that rounds one value across a quantisation boundary; museval's own test allows 0.1.
    """
    hq = need_shared(SAMPLE / "hq")
    reference = _load(need_shared(SAMPLE / "museval-reference-random.json"))
    track = musdb.DB(root=str(hq), is_wav=True, subsets="train").tracks[0]
    np.random.seed(0)  # as the sample's README says the reference was drawn
    vocals = np.random.random(track.audio.shape)
    accompaniment = np.random.random(track.audio.shape)
    folder = tmp_path / "est" / "train" / track.name
    folder.mkdir(parents=True)
    # 64-bit float WAVs: the estimates reach museval bit-exact, as the in-memory arrays did
    sf.write(folder / "vocals.wav", vocals, track.rate, subtype="DOUBLE")
    sf.write(folder / "accompaniment.wav", accompaniment, track.rate, subtype="DOUBLE")

    flags = ["--backend", backend] if backend else []
    result = run_cli("eval", tmp_path / "est", "--musdb", hq, "--is-wav", "--subset", "train", "-o", tmp_path / "scores", "-q",
                     *flags)
    assert result.code == 0, result.err
    assert result.out.strip() == str(tmp_path / "scores")
    doc = _load(tmp_path / "scores" / "train" / f"{track.name}.json")
    assert doc["umxtools"]["backend"] == (backend or "fast")
    ours = _frames(doc)
    theirs = _frames(reference)
    assert list(ours) == list(theirs) == ["vocals", "accompaniment"]
    worst = 0.0
    for target, frames in theirs.items():
        assert len(ours[target]) == len(frames) == 6  # whole 1 s windows of the 7 s preview
        for mine, ref in zip(ours[target], frames):
            for metric in ("SDR", "SIR", "ISR", "SAR"):
                worst = max(worst, abs(float(mine[metric]) - float(ref[metric])))
    assert worst <= 1e-5 + 1e-12, worst


def test_scores_equal_eval_mus_track_on_oracle_estimates(toy, irm, tmp_path):
    """Per-track JSON = museval.eval_mus_track on the same estimates (both museval groups).

    vocals, drums and accompaniment: drums is scored jointly with vocals (whose scores museval
    drops), then vocals with accompaniment. Shard 0/2 scores toy_001 only.
    """
    references = MusdbReferences(str(toy), is_wav=True, subset="test")
    targets = ["vocals", "drums", "accompaniment"]
    summary = evaluate_estimates(irm, references, tmp_path / "scores", targets=targets, shard=Shard(0, 2), backend="museval")
    assert summary.scored == ["toy_001"] and not summary.failed and not summary.skipped
    assert summary.seconds_scored == pytest.approx(SECONDS)
    assert not (tmp_path / "scores" / "test" / "toy_002.json").exists()

    track = {t.name: t for t in musdb.DB(root=str(toy), is_wav=True, subsets="test").tracks}["toy_001"]
    estimates = {t: sf.read(irm / "test" / "toy_001" / f"{t}.wav", always_2d=True)[0] for t in targets}
    expected = museval.eval_mus_track(track, estimates)
    doc = _load(tmp_path / "scores" / "test" / "toy_001.json")
    assert doc["targets"] == simplejson.loads(expected.json, use_decimal=True)["targets"]
    assert [t["name"] for t in doc["targets"]] == ["drums", "vocals", "accompaniment"]
    assert doc["museval_version"] == museval.version._version

    block = doc["umxtools"]
    assert block["backend"] == "museval" and block["mode"] == "v4" and block["win"] == block["hop"] == 1.0
    assert block["bsseval_groups"] == [["vocals", "drums"], ["vocals", "accompaniment"]]
    # the MDX challenge SDR, written out here from the challenge's definition
    for target in targets:
        s, e = track.targets[target].audio, estimates[target]
        mdx = 10 * np.log10((np.sum(s**2) + USDR_DELTA) / (np.sum((s - e) ** 2) + USDR_DELTA))
        assert float(block["whole_track_sdr"]["values"][target]) == pytest.approx(mdx, abs=1e-9)
    # museval's own aggregation reads umxtools' files
    store = museval.EvalStore()
    store.add_eval_dir(tmp_path / "scores")
    assert set(store.df["target"]) == set(targets)


def test_folder_references_equal_museval_evaluate_with_shorter_estimates(toy, tmp_path):
    """--references DIR: scores = museval.evaluate on the same arrays, museval padding the estimates.

    Estimates are filtered mixtures (a low-pass for bass, the rest for other), 0.3 s shorter than
    the references: museval pads them with zeros.
    """
    from scipy.signal import butter, sosfiltfilt

    folder = toy / "test"
    mixture, rate = sf.read(folder / "toy_002" / "mixture.wav", always_2d=True)
    low = sosfiltfilt(butter(4, 150, fs=rate, output="sos"), mixture, axis=0)
    short = mixture.shape[0] - int(0.3 * rate)
    est = tmp_path / "est" / "toy_002"
    est.mkdir(parents=True)
    sf.write(est / "bass.wav", low[:short], rate, subtype="DOUBLE")
    sf.write(est / "other.wav", (mixture - low)[:short], rate, subtype="DOUBLE")

    with pytest.warns(UserWarning) as caught:  # museval pads them in silence; umxtools says so, once per file
        summary = evaluate_estimates(tmp_path / "est", FolderReferences(str(folder)), tmp_path / "scores", backend="museval")
    assert sorted(str(w.message).split(":")[0] for w in caught) == [str(est / "bass.wav"), str(est / "other.wav")]
    assert summary.scored == ["toy_002"] and summary.targets == ["bass", "other"]
    assert summary.references_without_estimates == 1
    doc = _load(tmp_path / "scores" / "toy_002.json")
    assert doc["umxtools"]["estimate_nb_samples"] == {"bass": short, "other": short}

    refs = [sf.read(folder / "toy_002" / f"{t}.wav", always_2d=True)[0] for t in ("bass", "other")]
    ests = [low[:short], (mixture - low)[:short]]
    sdr, isr, sir, sar = museval.evaluate(refs, ests, win=rate, hop=rate)  # pads the estimates itself
    store = museval.TrackStore(win=1.0, hop=1.0, track_name="toy_002")
    for i, target in enumerate(("bass", "other")):
        store.add_target(target, {"SDR": sdr[i].tolist(), "SIR": sir[i].tolist(), "ISR": isr[i].tolist(), "SAR": sar[i].tolist()})
    assert doc["targets"] == simplejson.loads(store.json, use_decimal=True)["targets"]


def test_fast_backend_gives_the_museval_backend_scores(tmp_path):
    """The default backend through the whole eval path: both museval groups (vocals, drums, bass,
    other; vocals, accompaniment), every frame within TOLERANCE_DB of --backend museval and NaN in the
    same frames. Toy stems over a noise floor (tests/test_metrics.py says why) with a silent
    second in the drums, 2.5 s (not whole frames), ideal-ratio-mask estimates."""
    from tests.test_metrics import TOLERANCE_DB, ideal_ratio_mask_estimates, toy_references

    stems = toy_references(2.5, seed=8)
    stems[1, RATE:2 * RATE] = 0  # silent drums in frame 1: NaN for every target of that group
    estimates = ideal_ratio_mask_estimates(stems)
    names = ("vocals", "drums", "bass", "other")
    for root, audio in (("refs", stems), ("est", estimates)):
        (tmp_path / root / "toy").mkdir(parents=True)
        for name, signal in zip(names, audio):
            sf.write(tmp_path / root / "toy" / f"{name}.wav", signal, RATE, subtype="DOUBLE")
    sf.write(tmp_path / "est" / "toy" / "accompaniment.wav", estimates[1:].sum(axis=0), RATE, subtype="DOUBLE")

    docs = {}
    for backend in ("fast", "museval"):
        summary = evaluate_estimates(tmp_path / "est", FolderReferences(str(tmp_path / "refs")), tmp_path / backend,
                                     backend=backend)
        assert summary.scored == ["toy"] and not summary.failed
        docs[backend] = _load(tmp_path / backend / "toy.json")
        assert docs[backend]["umxtools"]["backend"] == backend
    fast, slow = _frames(docs["fast"]), _frames(docs["museval"])
    assert list(fast) == list(slow) == ["drums", "bass", "other", "vocals", "accompaniment"]
    nan_frames = 0
    for target, frames in slow.items():
        assert len(fast[target]) == len(frames) == 2
        for mine, theirs in zip(fast[target], frames):
            for metric in ("SDR", "SIR", "ISR", "SAR"):
                a, b = float(mine[metric]), float(theirs[metric])
                assert np.isnan(a) == np.isnan(b), (target, metric, a, b)
                nan_frames += np.isnan(b)
                if not np.isnan(b):
                    assert abs(a - b) <= TOLERANCE_DB + 1e-5, (target, metric, a, b)  # + one 1e-5 quantum
    assert nan_frames == 3 * 4  # frame 1 of drums, bass and other


@pytest.mark.parametrize("subtype", ["FLOAT", "PCM_16", "PCM_24"])
def test_musdb_references_are_the_arrays_musdb_decodes(tmp_path, subtype):
    """--musdb --is-wav reads 16-bit and float WAVs with soundfile instead of musdb's ffmpeg: the
    samples must be musdb's to the bit, including float samples exactly between two 16-bit
    steps (ffmpeg rounds half to even) and beyond full scale (it saturates). Other subtypes go
    through musdb itself."""
    rng = np.random.default_rng(4)
    edges = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 32767.5, -32768.5, 40000.0, -40000.0]) / 32768
    folder = tmp_path / "test" / "edges"
    folder.mkdir(parents=True)
    for k, name in enumerate(("mixture", "drums", "bass", "other", "vocals")):
        audio = rng.uniform(-1.1, 1.1, (3000, 2))
        audio[k:k + len(edges), 0] = edges
        sf.write(folder / f"{name}.wav", audio, RATE, subtype=subtype)
    ours = MusdbReferences(str(tmp_path), is_wav=True, subset="test").load("edges")
    track = musdb.DB(root=str(tmp_path), is_wav=True, subsets="test").tracks[0]
    for name in ("drums", "bass", "other", "vocals"):
        assert np.array_equal(ours.source(name), track.sources[name].audio), name
    for name in ("vocals", "accompaniment"):
        assert np.array_equal(ours.target(name), track.targets[name].audio), name
    assert np.array_equal(ours.mixture(), track.audio)


def test_fit_length_is_museval_pad_or_truncate():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((1, 1000, 2))
    for length in (700, 1000, 1300):
        estimate = rng.standard_normal((1, length, 2))
        _, expected = museval.pad_or_truncate(reference, estimate)
        np.testing.assert_array_equal(fit_length(estimate[0], 1000), expected[0])


def test_groups_follow_eval_mus_track():
    assert bsseval_groups(["vocals", "drums", "bass", "other"]) == [(["vocals", "drums", "bass", "other"],) * 2]
    assert bsseval_groups(["vocals", "accompaniment"]) == [(["vocals", "accompaniment"],) * 2]
    assert bsseval_groups(["vocals", "drums", "bass", "other", "accompaniment"]) == [
        (["vocals", "drums", "bass", "other"], ["drums", "bass", "other"]),
        (["vocals", "accompaniment"], ["vocals", "accompaniment"]),
    ]
    assert bsseval_groups(["drums", "accompaniment"]) == [(["drums", "accompaniment"],) * 2]
    assert bsseval_groups(["vocals"]) == []


# --- parallel, resume ----------------------------------------------------------------------------


def test_jobs_resume_and_corrupt_file(toy, irm, tmp_path, run_cli):
    """--jobs 2 scores like one process; a rerun skips everything; a corrupt file is rescored."""
    scores = tmp_path / "scores"
    args = ("eval", irm / "test", "--references", toy / "test", "--targets", "vocals,accompaniment", "-o", scores, "-q")
    first = run_cli(*args, "--jobs", "2")
    assert first.code == 0, first.err
    assert first.out.strip() == str(scores)
    parallel = _load(scores / "toy_001.json")
    stamps = {n: (scores / f"{n}.json").stat().st_mtime_ns for n in ("toy_001", "toy_002")}

    again = run_cli(*args[:-1])  # not quiet: the summary line
    assert again.code == 0, again.err
    assert again.err.strip() == "scored 0 track(s) (0.0 s of audio), 2 already scored; targets vocals, accompaniment"
    assert {n: (scores / f"{n}.json").stat().st_mtime_ns for n in stamps} == stamps

    (scores / "toy_001.json").write_text('{"targets": [')  # a truncated file
    third = run_cli(*args)
    assert third.code == 0, third.err
    lines = [line for line in third.err.splitlines() if line.strip()]
    assert len(lines) == 1, third.err
    assert lines[0].startswith(f"umxtools: warning: {scores / 'toy_001.json'}: corrupt score file (")
    assert lines[0].endswith("); scoring the track again")
    assert (scores / "toy_002.json").stat().st_mtime_ns == stamps["toy_002"]
    serial = _load(scores / "toy_001.json")
    # workers run the parent's arithmetic (its BLAS settings): every metric identical, not only
    # SDR. On these band-limited toy references ISR/SIR/SAR come from an ill-conditioned solve
    # and move by dB with the number of BLAS threads (see docs/eval.md).
    assert serial["targets"] == parallel["targets"]


def test_resume_rescores_changed_estimates(toy, irm, tmp_path):
    """A score file records its estimates' size and mtime; an estimate written since is rescored."""
    from umxtools.evaluation import _resume_state, _run_settings, to_json

    targets = ["vocals", "accompaniment"]
    folder = tmp_path / "est"
    folder.mkdir()
    for t in targets:
        (folder / f"{t}.wav").write_bytes((irm / "test" / "toy_001" / f"{t}.wav").read_bytes())
    files = [{"target": t, "size": (folder / f"{t}.wav").stat().st_size, "mtime_ns": (folder / f"{t}.wav").stat().st_mtime_ns}
             for t in targets]
    settings = _run_settings("museval", targets)
    path = tmp_path / "toy_001.json"
    path.write_text(to_json({"targets": [], "umxtools": {**settings, "estimates": files}}))
    assert _resume_state(path, settings, folder, targets) == "done"
    changed = folder / "vocals.wav"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    assert _resume_state(path, settings, folder, targets) == "stale"
    assert _resume_state(tmp_path / "absent.json", settings, folder, targets) == "todo"
