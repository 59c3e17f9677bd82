"""Oracle baselines: the definitions on analytic signals, the estimates folder, and their scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import error_line
from umxtools.cache import Shard
from umxtools.evaluation import evaluate_estimates, read_scores
from umxtools.fileio import MARKER
from umxtools.oracle import MANIFEST, METHODS, oracle_estimates, write_oracle
from umxtools.references import FolderReferences
from umxtools.toy import make_toy_dataset

RATE = 44100


def _snr(reference: np.ndarray, estimate: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference**2) / np.sum((reference - estimate) ** 2)))


@pytest.fixture(scope="module")
def noise_sources() -> dict[str, np.ndarray]:
    """Two white noises, each panned to its own stereo direction, plus a little diffuse noise.

    The diffuse part keeps each spatial covariance full rank, as the local Gaussian model assumes
    (a perfectly panned source has a singular R_j, which the reference's PSD refinement inverts).
    Shapes ``(2, samples)``.
    """
    rng = np.random.default_rng(0)
    n1, n2, *diffuse = rng.standard_normal((6, RATE)) * 0.1
    d = 0.03 * np.array(diffuse)
    return {"vocals": np.stack([n1 + d[0], 0.3 * n1 + d[1]]), "drums": np.stack([0.2 * n2 + d[2], n2 + d[3]])}


def test_mix_is_the_mixture_over_the_number_of_sources(noise_sources):
    mixture = sum(noise_sources.values())
    est = oracle_estimates("mix", mixture, noise_sources)
    assert set(est) == {"vocals", "drums", "accompaniment"}
    np.testing.assert_array_equal(est["vocals"], mixture / 2)
    np.testing.assert_array_equal(est["accompaniment"], est["drums"])  # the sum of every source but vocals


# Ratio masks sum to P/(eps + P); Wiener gains to Cxx/(eps + det Cxx)-scaled inverses: eps is
# not negligible next to det Cxx, since scipy's STFT divides by the window sum (powers ~1e-5 here).
@pytest.mark.parametrize(("method", "tolerance"), [("irm1", 1e-9), ("irm2", 1e-9), ("mwf", 1e-3)])
def test_soft_masks_and_wiener_gains_sum_to_the_mixture(method, tolerance, noise_sources):
    mixture = sum(noise_sources.values())
    est = oracle_estimates(method, mixture, noise_sources)
    for name, audio in est.items():
        assert audio.shape == mixture.shape, name
    residual = mixture - est["vocals"] - est["drums"]
    assert np.max(np.abs(residual)) < tolerance * np.max(np.abs(mixture))


def test_mwf_separates_panned_noises_that_masks_cannot(noise_sources):
    """Same white spectra, different directions: only the multichannel filter tells them apart."""
    mixture = sum(noise_sources.values())
    snr = {m: _snr(noise_sources["vocals"], oracle_estimates(m, mixture, noise_sources)["vocals"]) for m in ("irm2", "ibm", "mwf")}
    assert snr["mwf"] > 20 and snr["mwf"] > snr["irm2"] + 10, snr  # 26 dB vs 11 dB here
    assert snr["irm2"] < 12 and snr["ibm"] < 12, snr


def test_ibm_splits_disjoint_spectra():
    t = np.arange(RATE) / RATE
    low = np.tile(0.3 * np.sin(2 * np.pi * 220 * t), (2, 1))
    high = np.tile(0.3 * np.sin(2 * np.pi * 6000 * t), (2, 1))
    est = oracle_estimates("ibm", low + high, {"bass": low, "other": high})
    assert "accompaniment" not in est  # no vocals: no accompaniment
    assert _snr(low, est["bass"]) > 30 and _snr(high, est["other"]) > 30


def test_unknown_method():
    from umxtools.errors import UsageError

    with pytest.raises(UsageError, match="unknown oracle method 'irm3'; one of mix, irm1, irm2, ibm, mwf"):
        oracle_estimates("irm3", np.zeros((2, 10)), {"vocals": np.zeros((2, 10))})


# --- on the toy dataset ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("oracletoy")
    make_toy_dataset(root, tracks=1, seconds=2.0, seed=7, test_tracks=2)
    return root


def test_oracle_writes_an_estimates_folder(toy, tmp_path, run_cli):
    out = tmp_path / "ibm"
    # the train subset: one track, musdb's ffmpeg decoding costs about 0.2 s per stream
    result = run_cli("oracle", toy, "--is-wav", "--subset", "train", "--method", "ibm", "-o", out, "-q")
    assert result.code == 0, result.err
    assert result.out.strip() == str(out)
    assert [p.name for p in (out / "train").iterdir()] == ["toy_000"]
    files = sorted(p.name for p in (out / "train" / "toy_000").iterdir())
    assert files == ["accompaniment.wav", "bass.wav", "drums.wav", "oracle.json", "other.wav", "vocals.wav"]
    info = sf.info(out / "train" / "toy_000" / "vocals.wav")
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (RATE, 2, 2 * RATE, "FLOAT")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["method"] == "ibm" and manifest["references"]["subset"] == "train"

    line = error_line(run_cli("oracle", toy, "--is-wav", "--subset", "train", "--method", "mwf", "-o", out))
    assert line == f"umxtools: error: {out}: holds ibm estimates of {toy.resolve()}; write into another folder or pass --force"
    folder = run_cli("oracle", "--references", toy / "test", "--method", "mix", "--targets", "vocals,accompaniment", "-o", tmp_path / "mix", "-q")
    assert folder.code == 0, folder.err
    assert sorted(p.name for p in (tmp_path / "mix" / "toy_002").iterdir()) == ["accompaniment.wav", "oracle.json", "vocals.wav"]


def test_irm_scores_far_above_the_mixture(toy, tmp_path, run_cli):
    """The sanity check of the whole chain: oracle -> eval -> report, with numbers.

    On the toy test tracks (2 s, vocals/accompaniment) the power IRM scores about 11 dB vocals
    SDR and the mixture about 1 dB; the bounds leave room for other seeds and BLAS builds.
    """
    refs = FolderReferences(str(toy / "test"))  # soundfile reads; musdb would run ffmpeg per stream
    medians = {}
    for method in ("irm2", "mix"):
        write_oracle(refs, method, tmp_path / method, targets=["vocals", "accompaniment"])
        summary = evaluate_estimates(tmp_path / method, refs, tmp_path / f"scores-{method}")
        assert summary.scored == ["toy_001", "toy_002"] and not summary.failed
        for track in summary.scored:
            doc = read_scores(tmp_path / f"scores-{method}" / f"{track}.json")
            for t in doc["targets"]:
                sdr = np.nanmedian([float(f["metrics"]["SDR"]) for f in t["frames"]])
                medians[method, t["name"], track] = (sdr, doc["umxtools"]["whole_track_sdr"]["values"][t["name"]])
    for track in ("toy_001", "toy_002"):
        irm_v, mix_v = medians["irm2", "vocals", track], medians["mix", "vocals", track]
        irm_a, mix_a = medians["irm2", "accompaniment", track], medians["mix", "accompaniment", track]
        assert irm_v[0] > 8 and mix_v[0] < 4 and irm_v[0] - mix_v[0] > 6, (irm_v, mix_v)  # BSSEval SDR
        assert irm_v[1] > 8 and mix_v[1] < 4, (irm_v, mix_v)  # uSDR
        assert irm_a[0] - mix_a[0] > 5 and irm_a[1] - mix_a[1] > 5, (irm_a, mix_a)

    report = run_cli("report", f"IRM2={tmp_path / 'scores-irm2'}", f"MIX={tmp_path / 'scores-mix'}", "-o", tmp_path / "report")
    assert report.code == 0, report.err
    assert report.out.strip() == str(tmp_path / "report")
    assert "median over frames, then median over tracks" in report.err  # the table's caption
    rows = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert rows[0] == "method,target,tracks,SDR,SIR,ISR,SAR,uSDR,aggregation"
    assert [r.split(",")[:3] for r in rows[1:]] == [["IRM2", "vocals", "2"], ["IRM2", "accompaniment", "2"],
                                                    ["MIX", "vocals", "2"], ["MIX", "accompaniment", "2"]]
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [MARKER, "report.csv", "report.md", "sdr_accompaniment.png",
                                                                     "sdr_vocals.png"]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_registered_method_runs_and_separates_disjoint_spectra(method):
    """Each name the registry offers (and the CLI's --method lists) runs: on two sources with
    disjoint spectra and different stereo images, every oracle recovers each source (measured 40
    to 50 dB), except the mixture baseline, which is half the mixture for each."""
    t = np.arange(RATE) / RATE
    low = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 220 * t + 1)])
    high = np.stack([0.1 * np.sin(2 * np.pi * 6000 * t + 2), 0.3 * np.sin(2 * np.pi * 6000 * t)])
    est = oracle_estimates(method, low + high, {"bass": low, "other": high})
    if method == "mix":
        np.testing.assert_array_equal(est["bass"], (low + high) / 2)
        np.testing.assert_array_equal(est["other"], (low + high) / 2)
    else:
        assert _snr(low, est["bass"]) > 35 and _snr(high, est["other"]) > 35, method


# --- safe by construction: what oracle refuses, and what it writes -------------------------------


def _refs(toy: Path, folder: Path, names=("toy_001",)) -> Path:
    """A references folder of copies of toy_001 (2 s), read by soundfile: no ffmpeg."""
    import shutil

    for name in names:
        shutil.copytree(toy / "test" / "toy_001", folder / name)
    return folder


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _oracle(run_cli, refs: Path, out: Path, *flags):
    return run_cli("oracle", "--references", refs, "--method", "mix", "--targets", "vocals,accompaniment", "-o", out, "-q", *flags)


def test_oracle_never_writes_over_a_models_estimates(toy, tmp_path, run_cli):
    """`oracle -o DIR` once overwrote a model's estimates in DIR. A folder of estimates that
    separate wrote (separation.json per track, with or without its marker) is refused, --force too."""
    refs = _refs(toy, tmp_path / "refs")
    model = tmp_path / "umx"
    (model / "toy_001").mkdir(parents=True)
    (model / "toy_001" / "vocals.wav").write_bytes(b"the model's vocals")
    (model / "toy_001" / "separation.json").write_text("{}")
    before = _files(model)
    for flags in ((), ("--force",)):
        line = error_line(_oracle(run_cli, refs, model, *flags))
        assert line == (f"umxtools: error: {model}: holds files that 'umxtools oracle' did not make (toy_001, ...); "
                        "choose an empty or new folder (-o)")
    (model / MARKER).write_text('{"command": "separate"}')
    before = _files(model)
    line = error_line(_oracle(run_cli, refs, model, "--force"))
    assert line == f"umxtools: error: {model}: holds the output of 'umxtools separate', not of 'umxtools oracle'; choose another folder (-o)"
    assert _files(model) == before


@pytest.mark.parametrize("where", ["is", "inside", "around"])
def test_oracle_never_writes_into_its_dataset(toy, tmp_path, run_cli, where):
    refs = _refs(toy, tmp_path / "data" / "refs")
    out = {"is": refs, "inside": refs / "toy_001" / "oracle", "around": tmp_path / "data"}[where]
    before = _files(tmp_path)
    line = error_line(_oracle(run_cli, refs, out, "--force"))
    relation = {"is": "is", "inside": "lies inside", "around": "contains"}[where]
    assert line == f"umxtools: error: {out}: {relation} the dataset {refs}; write the output somewhere else (-o)"
    assert _files(tmp_path) == before


def test_oracle_reruns_into_its_own_folder_and_force_replaces_it(toy, tmp_path, run_cli):
    """make's rerun: the same method into its own folder (holding make's .complete) works; another
    method needs --force, which leaves no estimate of the old method beside the new ones."""
    refs = _refs(toy, tmp_path / "refs")
    out = tmp_path / "est"
    assert run_cli("oracle", "--references", refs, "--method", "irm2", "-o", out, "-q").code == 0
    (out / ".complete").touch()
    rerun = run_cli("oracle", "--references", refs, "--method", "irm2", "-o", out, "-q")
    assert rerun.code == 0, rerun.err
    assert sorted(p.name for p in (out / "toy_001").iterdir()) == ["accompaniment.wav", "bass.wav", "drums.wav", "oracle.json", "other.wav",
                                                                   "vocals.wav"]
    line = error_line(_oracle(run_cli, refs, out))
    assert line == f"umxtools: error: {out}: holds irm2 estimates of {refs.resolve()}; write into another folder or pass --force"
    assert _oracle(run_cli, refs, out, "--force").code == 0
    assert sorted(p.name for p in (out / "toy_001").iterdir()) == ["accompaniment.wav", "oracle.json", "vocals.wav"]
    assert json.loads((out / MANIFEST).read_text())["method"] == "mix"


def test_oracle_names_become_paths_only_when_plain(toy, tmp_path, run_cli):
    refs = _refs(toy, tmp_path / "refs", names=("toy_001", "bad\tname"))
    out = tmp_path / "est"
    line = error_line(_oracle(run_cli, refs, out))
    assert line == f"umxtools: error: {refs}: track 'bad\\tname' contains a control character; it must be a plain file name"
    line = error_line(run_cli("oracle", "--references", refs, "--method", "mix", "--targets", "vocals,../../evil", "-o", out))
    assert line == "umxtools: error: target '../../evil' contains a path separator; it must be a plain file name"
    assert not out.exists() and not list(tmp_path.rglob("*evil*"))


def test_oracle_output_problems_are_one_line_before_any_track(toy, tmp_path, run_cli, monkeypatch):
    import soundfile

    refs = _refs(toy, tmp_path / "refs")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    computed = []
    monkeypatch.setattr("umxtools.oracle.METHODS", {**METHODS, "mix": lambda m, s: computed.append(1) or METHODS["mix"](m, s)})
    line = error_line(_oracle(run_cli, refs, blocker / "est"))
    assert line == f"umxtools: error: {blocker / 'est'}: a part of the path is a file, not a folder"
    assert computed == []

    # the disk fills up while an estimate is written: libsndfile's "System error" becomes one line
    def full(path, *args, **kwargs):
        raise soundfile.LibsndfileError(2, f"Error writing {path!r}: ")

    monkeypatch.setattr(soundfile, "write", full)
    out = tmp_path / "est"
    line = error_line(_oracle(run_cli, refs, out))
    assert line == (f"umxtools: error: {out / 'toy_001' / 'vocals.wav'}: cannot write the estimate (System error.); "
                    "check the free space and quota there")
    assert not list(out.rglob("*.wav")) and not list(out.rglob("*.tmp")) and not list(out.rglob("*.partial"))


def test_oracle_files_have_the_umask_mode(toy, tmp_path):
    """Colleagues on a shared cluster read the estimates: umask 027 gives 0640, not mkstemp's 0600."""
    from tests.conftest import modes, run_with_umask

    refs = _refs(toy, tmp_path / "refs")
    result = run_with_umask(0o027, "oracle", "--references", refs, "--method", "mix", "--targets", "vocals,accompaniment",
                            "-o", tmp_path / "est", "-q")
    assert result.code == 0, result.err
    assert modes(tmp_path / "est") == {name: 0o640 for name in
                                       (MARKER, "toy_001/accompaniment.wav", "toy_001/oracle.json", "toy_001/vocals.wav", MANIFEST)}


# --- requeue-safe: shards, reruns, killed runs ------------------------------------------------------


def test_shards_share_one_folder_and_equal_one_run(toy, tmp_path, run_cli):
    """A 2-task array writes the same estimates as one process; a rerun skips; --force redoes."""
    refs = _refs(toy, tmp_path / "refs", names=("t0", "t1", "t2"))
    single, array = tmp_path / "single", tmp_path / "array"
    assert _oracle(run_cli, refs, single).code == 0
    for k in (0, 1):
        result = _oracle(run_cli, refs, array, "--shard", f"{k}/2")
        assert (result.code, result.out.strip()) == (0, str(array)), result.err
    assert sorted(p.name for p in array.iterdir()) == sorted(p.name for p in single.iterdir())
    for name in ("t0", "t1", "t2"):
        for target in ("vocals", "accompaniment"):
            a, b = sf.read(single / name / f"{target}.wav")[0], sf.read(array / name / f"{target}.wav")[0]
            assert (a == b).all(), (name, target)

    rerun = run_cli("oracle", "--references", refs, "--method", "mix", "--targets", "vocals,accompaniment", "-o", array)
    assert rerun.code == 0 and rerun.err.splitlines()[-1] == "wrote 0 track(s), 3 already complete (--force redoes them)"
    forced = run_cli("oracle", "--references", refs, "--method", "mix", "--targets", "vocals", "-o", array, "--force", "--shard", "1/2")
    assert forced.code == 0 and forced.err.splitlines()[-1] == "wrote 1 track(s), 0 already complete (--force redoes them)"
    assert sorted(p.name for p in (array / "t1").iterdir()) == ["oracle.json", "vocals.wav"]  # redone with the targets asked
    # more targets than a track has: it is not complete, and is redone without --force
    more = run_cli("oracle", "--references", refs, "--method", "mix", "--targets", "vocals,accompaniment", "-o", array)
    assert more.code == 0 and more.err.splitlines()[-1] == "wrote 1 track(s), 2 already complete (--force redoes them)"


def test_a_shard_with_no_track_says_so_and_writes_nothing(toy, tmp_path, run_cli):
    refs = _refs(toy, tmp_path / "refs", names=("t0", "t1"))
    result = _oracle(run_cli, refs, tmp_path / "est", "--shard", "3/4")
    assert error_line(result) == f"umxtools: error: shard 3/4 selects none of the 2 tracks of {refs}; use at most 2 shards"
    assert result.out == "" and not (tmp_path / "est").exists()


def test_a_killed_runs_partial_tracks_are_cleaned_and_redone(toy, tmp_path, run_cli):
    """SIGKILL (out of memory, Slurm after KillWait) leaves a staging folder; an older umxtools
    left track folders without their record. The next run removes the one and redoes the other."""
    refs = _refs(toy, tmp_path / "refs", names=("t0", "t1"))
    out = tmp_path / "est"
    assert _oracle(run_cli, refs, out).code == 0
    staging = out / ".t0.4242-0123abcd.partial"
    staging.mkdir()
    (staging / "vocals.wav").write_bytes(b"half")
    (out / "t1" / "oracle.json").unlink()
    (out / "t1" / "accompaniment.wav").write_bytes(b"truncated")
    result = _oracle(run_cli, refs, out)
    assert result.code == 0, result.err
    assert not staging.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, MANIFEST, "t0", "t1"])
    from umxtools.oracle import track_problem

    assert track_problem(out / "t1", "mix", None, ["vocals", "accompaniment"]) is None
    assert sf.info(out / "t1" / "accompaniment.wav").frames == 2 * RATE


def test_shards_starting_together_both_claim_the_new_folder(toy, tmp_path, monkeypatch):
    """Shard 1 looks at the folder just after shard 0 marked it as oracle's, before shard 0 wrote
    its manifest: it once read 'unknown estimates' there and refused the folder."""
    import threading

    from umxtools import fileio

    refs = FolderReferences(str(_refs(toy, tmp_path / "refs", names=("t0", "t1"))))
    out = tmp_path / "est"
    real_claim = fileio.claim_folder
    errors, others = [], []

    def other_shard():
        try:
            write_oracle(refs, "mix", out, targets=["vocals", "accompaniment"], shard=Shard(1, 2))
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    def claim_then_let_the_other_shard_look(folder, command, *args):
        path = real_claim(folder, command, *args)
        if not others:
            others.append(threading.Thread(target=other_shard))
            others[0].start()
            others[0].join(timeout=1)  # without the lock it finishes (or fails) here
        return path

    monkeypatch.setattr(fileio, "claim_folder", claim_then_let_the_other_shard_look)
    summary = write_oracle(refs, "mix", out, targets=["vocals", "accompaniment"], shard=Shard(0, 2))
    others[0].join(timeout=60)
    assert errors == [] and summary.written == ["t0"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted([MANIFEST, "t0", "t1"])


def test_folder_is_a_deprecated_alias_of_references(toy, tmp_path, run_cli):
    refs = _refs(toy, tmp_path / "refs")
    result = run_cli("oracle", refs, "--folder", "--method", "mix", "--targets", "vocals,accompaniment", "-o", tmp_path / "est", "-q")
    assert (result.code, result.out.strip()) == (0, str(tmp_path / "est"))
    assert result.err.splitlines() == ["umxtools: warning: --folder is deprecated: use --references ROOT"]
    assert sorted(p.name for p in (tmp_path / "est" / "toy_001").iterdir()) == ["accompaniment.wav", "oracle.json", "vocals.wav"]
