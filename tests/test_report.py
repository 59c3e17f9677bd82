"""umxtools report: aggregation against museval's own MethodStore, outputs, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import museval
import numpy as np
import pytest

from tests.conftest import error_line
from umxtools.evaluation import to_json
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
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.csv", "report.md"]


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
