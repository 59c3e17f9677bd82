"""umxtools report: aggregation against museval's own MethodStore, outputs, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import museval
import numpy as np
import pytest

from tests.conftest import error_line
from umxtools.evaluation import to_json
from umxtools.fileio import MARKER
from umxtools.report import AGGREGATIONS, aggregate, load_method, make_report

METRICS = ("SDR", "SIR", "ISR", "SAR")


def _doc(rng, targets, nb_frames, nan_frames=(), all_nan_target=None, usdr=True) -> dict:
    """A score document as museval writes it, with NaN frames where asked."""
    doc = {"targets": [], "museval_version": "0.4.1"}
    for target in targets:
        frames = []
        for i in range(nb_frames):
            nan = i in nan_frames or target == all_nan_target
            metrics = {m: math.nan if nan else round(float(rng.normal(5, 4)), 5) for m in METRICS}
            frames.append({"time": float(i), "duration": 1.0, "metrics": metrics})
        doc["targets"].append({"name": target, "frames": frames})
    if usdr:
        doc["umxtools"] = {"backend": "museval", "mode": "v4", "win": 1.0, "hop": 1.0,
                           "whole_track_sdr": {"name": "uSDR", "values": {t: float(rng.normal(6, 2)) for t in targets}}}
    return doc


@pytest.fixture(scope="module")
def methods(tmp_path_factory) -> dict[str, Path]:
    """Two methods' scores folders in museval's layout (test/<track>.json), with NaN frames.

    Method A: 5 tracks with an odd and even number of frames, some NaN frames, and a track whose
    vocals are NaN in every frame (a silent reference): it drops out of the vocals aggregate.
    """
    root = tmp_path_factory.mktemp("scores")
    rng = np.random.default_rng(0)
    out = {}
    for name, nb_tracks in (("A", 5), ("B", 4)):
        folder = root / name / "test"
        folder.mkdir(parents=True)
        for k in range(nb_tracks):
            doc = _doc(rng, ["vocals", "drums", "accompaniment"], nb_frames=6 + k, nan_frames={0, k},
                       all_nan_target="vocals" if (name, k) == ("A", 2) else None)
            (folder / f"track{k}.json").write_text(to_json(doc))
        out[name] = root / name
    return out


@pytest.mark.parametrize("agg", list(AGGREGATIONS))
def test_aggregates_equal_museval_methodstore(methods, agg):
    frames_agg, tracks_agg = AGGREGATIONS[agg]
    store = museval.MethodStore(frames_agg=frames_agg, tracks_agg=tracks_agg)
    for path in methods.values():
        store.add_eval_dir(path)  # method named after the folder, as ours
    expected = store.agg_frames_tracks_scores()
    report = aggregate([load_method(p) for p in methods.values()], agg)
    assert len(report.rows) == 6
    for row in report.rows:
        for metric in METRICS:
            assert row.values[metric] == pytest.approx(expected[(row.method, row.target, metric)], rel=1e-12, abs=1e-12)
    counts = {(r.method, r.target): r.tracks for r in report.rows}
    assert counts[("A", "vocals")] == 4 and counts[("A", "drums")] == 5 and counts[("B", "vocals")] == 4


def test_usdr_aggregates_over_tracks(methods):
    method = load_method(methods["B"])
    values = [method.usdr[t]["drums"] for t in sorted(method.usdr)]
    report = aggregate([method], "mean-of-medians")
    drums = next(r for r in report.rows if r.target == "drums")
    assert drums.values["uSDR"] == pytest.approx(np.mean(values))
    assert report.label == "BSSEval v4 metrics: median over frames, then mean over tracks; uSDR: mean over tracks"


def test_report_cli_outputs_state_their_aggregation(methods, tmp_path, run_cli):
    out = tmp_path / "report"
    result = run_cli("report", f"first={methods['A']}", methods["B"], "-o", out, "--agg", "mean")
    assert result.code == 0, result.err
    assert result.out.strip() == str(out)
    label = "BSSEval v4 metrics: mean over frames, then mean over tracks; uSDR: mean over tracks"
    # the table on stderr, captioned; plus the note that the methods cover different tracks
    assert "mean over frames, then mean over tracks" in result.err
    assert "umxtools: warning: the methods were scored on different tracks (first 5, B 4 tracks)" in result.err
    csv_rows = (out / "report.csv").read_text().splitlines()
    assert csv_rows[0] == "method,target,tracks,SDR,SIR,ISR,SAR,uSDR,aggregation"
    assert len(csv_rows) == 7 and all(r.endswith(f'"{label}"') for r in csv_rows[1:])
    assert [r.split(",")[:3] for r in csv_rows[1:3]] == [["first", "vocals", "4"], ["first", "drums", "5"]]
    markdown = (out / "report.md").read_text()
    assert f"Aggregation: {label}." in markdown and "| first | vocals | 4 |" in markdown
    for target in ("vocals", "drums", "accompaniment"):
        png = out / f"sdr_{target}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![sdr_{target}](sdr_{target}.png)" in markdown


def test_museval_written_scores_have_no_usdr(tmp_path):
    folder = tmp_path / "museval" / "test"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    (folder / "t.json").write_text(to_json(_doc(rng, ["vocals", "accompaniment"], 4, usdr=False)))
    report = make_report([str(tmp_path / "museval")], tmp_path / "out", plots=False)
    assert all(math.isnan(r.values["uSDR"]) and not math.isnan(r.values["SDR"]) for r in report.rows)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "report.csv", "report.md"]


def test_bad_scores(methods, tmp_path, run_cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error_line(run_cli("report", empty, "-o", tmp_path / "r")) == (
        f"umxtools: error: {empty}: no score files (*.json); make them with umxtools eval")
    corrupt = tmp_path / "corrupt" / "test"
    corrupt.mkdir(parents=True)
    (corrupt / "x.json").write_text('{"targets": [{"name": "vocals"}]}')
    assert error_line(run_cli("report", tmp_path / "corrupt", "-o", tmp_path / "r")) == (
        f"umxtools: error: {corrupt / 'x.json'}: corrupt score file (not museval's format: no 'targets' list of named frame lists)")
    line = error_line(run_cli("report", methods["A"], f"A={methods['B']}", "-o", tmp_path / "r"))
    assert line == "umxtools: error: two methods are named A; name them with NAME=PATH"
    assert not (tmp_path / "r").exists()


def test_methods_scored_on_other_target_sets_are_flagged(tmp_path):
    """vocals' SIR/ISR/SAR beside drums/bass/other differ from beside accompaniment: the report says so."""
    rng = np.random.default_rng(2)
    folders = []
    for name, targets in (("four", ["vocals", "drums", "bass", "other"]), ("two", ["vocals", "accompaniment"])):
        folder = tmp_path / name
        folder.mkdir()
        doc = _doc(rng, targets, 3)
        doc["umxtools"]["targets"] = targets
        (folder / "t.json").write_text(to_json(doc))
        folders.append(load_method(folder))
    notes = aggregate(folders).notes
    assert notes == ["the score files differ in backend, window or targets scored jointly: museval v4 win 1.0 hop 1.0 "
                     "targets vocals,accompaniment; museval v4 win 1.0 hop 1.0 targets vocals,drums,bass,other"]


# --- safe by construction: what report refuses, and what it writes ------------------------------


def _scores_folder(folder: Path, targets=("vocals", "accompaniment"), seed=3) -> Path:
    folder.mkdir(parents=True)
    (folder / "t.json").write_text(to_json(_doc(np.random.default_rng(seed), list(targets), 3)))
    return folder


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_target_name_from_a_score_file_cannot_write_outside_the_report(tmp_path, run_cli):
    """A crafted (or garbled) score file names its target '../../evil': sdr_../../evil.png would
    land two folders above the report. Refused with one line naming the file; nothing is written."""
    scores = _scores_folder(tmp_path / "work" / "scores", targets=("vocals", "../../evil"))
    before = _files(tmp_path)
    out = tmp_path / "work" / "a" / "b" / "report"
    line = error_line(run_cli("report", scores, "-o", out))
    assert line == (f"umxtools: error: {scores / 't.json'}: target '../../evil' contains a path separator; "
                    "it must be a plain file name")
    assert _files(tmp_path) == before and not out.exists()


@pytest.mark.parametrize("where", ["is", "inside", "around"])
def test_the_report_never_lands_in_a_scores_folder_it_reads(tmp_path, run_cli, where):
    scores = _scores_folder(tmp_path / "scores" / "umx")
    out = {"is": scores, "inside": scores / "report", "around": tmp_path / "scores"}[where]
    before = _files(tmp_path)
    line = error_line(run_cli("report", f"UMX={scores}", "-o", out))
    relation = {"is": "is", "inside": "lies inside", "around": "contains"}[where]
    assert line == f"umxtools: error: {out}: {relation} the scores folder {scores}; write the output somewhere else (-o)"
    assert _files(tmp_path) == before


def test_the_report_replaces_only_its_own_folder(tmp_path, run_cli):
    """-o pointing at a folder of something else (here a model's estimates) is refused; a rerun into
    its own folder replaces it, and plots of the earlier report do not outlive it."""
    scores = _scores_folder(tmp_path / "scores")
    theirs = tmp_path / "estimates"
    (theirs / "t").mkdir(parents=True)
    (theirs / "t" / "vocals.wav").write_bytes(b"RIFF....")
    line = error_line(run_cli("report", scores, "-o", theirs))
    assert line == (f"umxtools: error: {theirs}: holds files that 'umxtools report' did not make (t, ...); "
                    "choose an empty or new folder (-o)")
    assert _files(theirs) == {"t/vocals.wav": b"RIFF...."}

    out = tmp_path / "report"
    assert run_cli("report", scores, "-o", out, "-q").code == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["sdr_accompaniment.png", "sdr_vocals.png"]
    rerun = run_cli("report", scores, "-o", out, "-q", "--no-plots")
    assert rerun.code == 0, rerun.err
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "report.csv", "report.md"]


def test_an_unwritable_report_folder_is_one_line_before_anything_is_written(tmp_path, run_cli, monkeypatch):
    scores = _scores_folder(tmp_path / "scores")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = error_line(run_cli("report", scores, "-o", blocker / "report"))
    assert line == f"umxtools: error: {blocker / 'report'}: a part of the path is a file, not a folder"

    # a disk that fills up while the report is written: one line, no partial file
    real = Path.write_bytes

    def full(self, data):
        if data and self.parent == tmp_path / "full" and self.name.startswith(".report.csv"):
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    line = error_line(run_cli("report", scores, "-o", tmp_path / "full", "--no-plots"))
    assert line == f"umxtools: error: {tmp_path / 'full' / 'report.csv'}: no space left on device"
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == [MARKER]


def test_corrupt_numbers_in_a_score_file_are_one_line(tmp_path, run_cli):
    folder = _scores_folder(tmp_path / "scores")
    doc = _doc(np.random.default_rng(0), ["vocals", "accompaniment"], 2)
    doc["targets"][0]["frames"][1]["metrics"]["SDR"] = "n/a"
    (folder / "t.json").write_text(to_json(doc))
    line = error_line(run_cli("report", folder, "-o", tmp_path / "r"))
    assert line == (f"umxtools: error: {folder / 't.json'}: corrupt score file (ValueError: could not convert string "
                    "to float: 'n/a')")
    doc["targets"][0]["frames"][1]["metrics"]["SDR"] = 1.0
    doc["umxtools"]["whole_track_sdr"] = ["not", "a", "dict"]
    (folder / "t.json").write_text(to_json(doc))
    line = error_line(run_cli("report", folder, "-o", tmp_path / "r"))
    assert line.startswith(f"umxtools: error: {folder / 't.json'}: corrupt score file (AttributeError: ")
    assert not (tmp_path / "r").exists()


def test_report_files_have_the_umask_mode(tmp_path):
    """Colleagues on a shared cluster read the report: umask 027 gives 0640, not mkstemp's 0600."""
    from tests.conftest import modes, run_with_umask

    scores = _scores_folder(tmp_path / "scores")
    result = run_with_umask(0o027, "report", scores, "-o", tmp_path / "report", "-q")
    assert result.code == 0, result.err
    assert modes(tmp_path / "report") == {name: 0o640 for name in
                                          (MARKER, "report.csv", "report.md", "sdr_accompaniment.png", "sdr_vocals.png")}
