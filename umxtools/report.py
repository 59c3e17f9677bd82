"""One comparison of score folders: methods x targets x metrics, as a table, CSV, Markdown and plots.

Each method is a scores folder written by ``umxtools eval`` (or by museval: the frame scores are
the same format; only the uSDR column needs umxtools' block). Aggregation is explicit and stated
in every output, because projects differ silently here:

- ``median`` (default, SiSEC 2018 and open-unmix's published numbers): median over a track's
  1 s frames, then median over tracks;
- ``mean``: mean over frames, then mean over tracks;
- ``mean-of-medians``: median over frames, then mean over tracks.

NaN frames (a silent reference or estimate in that second) are left out of the frame aggregate,
as museval's ``EvalStore`` (pandas, skipna) does; a track whose frames are all NaN has no score
for that target and is left out of the track aggregate. uSDR (the MDX whole-track SDR) has one
value per track: only the track aggregation applies.

Outputs in the report folder: ``report.csv``, ``report.md`` and ``sdr_<target>.png`` (a box per
method of its per-track SDR). The report folder is new, empty or one ``report`` made
(:func:`umxtools.fileio.claim_folder`), and never a scores folder it reads, inside one or around
one; a target name read from a score file becomes a file name only if it is a plain one.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from umxtools import fileio
from umxtools.errors import DatasetError, ScoreError, UsageError, check_choice
from umxtools.evaluation import METRICS, USDR, canonical_order, read_scores

# name -> (over frames, over tracks)
AGGREGATIONS: dict[str, tuple[str, str]] = {
    "median": ("median", "median"),
    "mean": ("mean", "mean"),
    "mean-of-medians": ("median", "mean"),
}
COLUMNS = (*METRICS, USDR)
_FUNCS: dict[str, Callable[[np.ndarray], float]] = {"median": np.nanmedian, "mean": np.nanmean}


def aggregation_label(agg: str) -> str:
    """The sentence every output carries, e.g. 'BSSEval v4: median over 1 s frames, then ...'."""
    frames, tracks = AGGREGATIONS[agg]
    return f"BSSEval v4 metrics: {frames} over frames, then {tracks} over tracks; {USDR}: {tracks} over tracks"


def _agg(values, how: str) -> float:
    """NaN-skipping median or mean; NaN (without a warning) when nothing is left."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or np.all(np.isnan(values)):
        return math.nan
    return float(_FUNCS[how](values))


@dataclass
class MethodScores:
    """One scores folder: per track, per target, the frame values of each metric and the uSDR."""

    name: str
    path: Path
    frames: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)  # track -> target -> metric -> (frames,)
    usdr: dict[str, dict[str, float]] = field(default_factory=dict)  # track -> target -> value
    settings: set[tuple] = field(default_factory=set)  # (backend, mode, win, hop, targets) of its umxtools files

    @property
    def targets(self) -> list[str]:
        return canonical_order(t for per_track in self.frames.values() for t in per_track)


def load_method(path: str | Path, name: str | None = None) -> MethodScores:
    """Every ``*.json`` under ``path`` (one per track; the track is its path without ``.json``)."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(path, "no such scores folder (made by: umxtools eval ESTIMATES -o PATH ...)")
    try:
        files = sorted(p for p in path.rglob("*.json") if not p.name.startswith("."))
    except OSError as exc:
        raise DatasetError(path, f"cannot list the scores folder ({fileio.os_problem(exc)})") from exc
    if not files:
        raise DatasetError(path, "no score files (*.json); make them with umxtools eval")
    method = MethodScores(name=name or path.name, path=path)
    for file in files:
        doc = read_scores(file)  # a corrupt file stops the report: a silently dropped track biases it
        track = file.relative_to(path).with_suffix("").as_posix()
        try:
            _add_track(method, track, doc, file)
        except (TypeError, ValueError, AttributeError) as exc:  # a number that is not one, a dict that is a list
            raise ScoreError(file, f"corrupt score file ({type(exc).__name__}: {exc})") from exc
    return method


def _add_track(method: MethodScores, track: str, doc: dict, file: Path) -> None:
    """One score document's frames, uSDR and settings into ``method``."""
    per_target = {}
    for entry in doc["targets"]:
        # the target becomes part of a file name (sdr_<target>.png): a plain name or nothing
        name = fileio.check_name(entry["name"], "target", file)
        per_target[name] = {m: np.array([_number(f["metrics"].get(m)) for f in entry["frames"]], dtype=np.float64) for m in METRICS}
    method.frames[track] = per_target
    block = doc.get("umxtools")
    if isinstance(block, dict):
        values = (block.get("whole_track_sdr") or {}).get("values") or {}
        method.usdr[track] = {t: float(v) for t, v in values.items()}
        method.settings.add((block.get("backend"), block.get("mode"), block.get("win"), block.get("hop"),
                             tuple(block.get("targets") or ())))


def _number(value) -> float:
    return math.nan if value is None else float(value)


@dataclass
class Row:
    method: str
    target: str
    tracks: int  # tracks with a score for this target
    values: dict[str, float]  # metric -> aggregate


@dataclass
class Report:
    aggregation: str
    label: str
    rows: list[Row]
    methods: list[MethodScores]
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def per_track(method: MethodScores, target: str, metric: str, frames_agg: str) -> dict[str, float]:
    """``{track: frame aggregate}`` of one target and metric (uSDR: its single value)."""
    out = {}
    for track in sorted(method.frames):
        if target not in method.frames[track]:
            continue
        if metric == USDR:
            value = method.usdr.get(track, {}).get(target)
            out[track] = math.nan if value is None else value
        else:
            out[track] = _agg(method.frames[track][target][metric], frames_agg)
    return out


def aggregate(methods: list[MethodScores], agg: str = "median") -> Report:
    """The table: one row per method and target, one column per metric."""
    check_choice(agg, AGGREGATIONS, "aggregation")
    frames_agg, tracks_agg = AGGREGATIONS[agg]
    rows = []
    for method in methods:
        for target in method.targets:
            values, counts = {}, []
            for metric in COLUMNS:
                scores = per_track(method, target, metric, frames_agg)
                values[metric] = _agg(list(scores.values()), tracks_agg)
                if metric == "SDR":
                    counts = [t for t, v in scores.items() if not math.isnan(v)]
            rows.append(Row(method.name, target, len(counts), values))
    report = Report(aggregation=agg, label=aggregation_label(agg), rows=rows, methods=methods)
    track_sets = {m.name: set(m.frames) for m in methods}
    if len({frozenset(s) for s in track_sets.values()}) > 1:
        sizes = ", ".join(f"{n} {len(s)}" for n, s in track_sets.items())
        report.notes.append(f"the methods were scored on different tracks ({sizes} tracks): compare them on the same tracks")
    settings = {s for m in methods for s in m.settings}
    if len(settings) > 1:
        # BSSEval projects each estimate on all references scored with it: the SIR/ISR/SAR of vocals
        # beside drums, bass and other differ from beside accompaniment (SDR, the frame SNR, does not)
        described = sorted(f"{b} {mode} win {w} hop {h} targets {','.join(t)}" for b, mode, w, h, t in settings)
        report.notes.append("the score files differ in backend, window or targets scored jointly: " + "; ".join(described))
    return report


def _fmt(value: float, digits: int = 2) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def to_csv(report: Report) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "target", "tracks", *COLUMNS, "aggregation"])
    for row in report.rows:
        writer.writerow([row.method, row.target, row.tracks, *(repr(round(row.values[c], 6)) for c in COLUMNS), report.label])
    return buf.getvalue()


def to_markdown(report: Report, plots: list[Path] = ()) -> str:
    lines = ["# Separation scores", "", f"Aggregation: {report.label}. "
             f"{USDR} is the MDX challenge whole-track SDR; SDR, SIR, ISR and SAR are BSSEval v4 (museval) "
             "on 1 s frames. Values in dB.", ""]
    lines += ["| method | target | tracks | " + " | ".join(COLUMNS) + " |", "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for row in report.rows:
        lines.append(f"| {row.method} | {row.target} | {row.tracks} | " + " | ".join(_fmt(row.values[c]) for c in COLUMNS) + " |")
    lines.append("")
    for m in report.methods:
        lines.append(f"- `{m.name}`: {m.path} ({len(m.frames)} tracks)")
    for note in report.notes:
        lines.append(f"- Note: {note}")
    if plots:
        lines += ["", *[f"![{p.stem}]({p.name})" for p in plots]]
    return "\n".join(lines) + "\n"


def to_rich_table(report: Report):
    """A rich Table of the report (the CLI prints it)."""
    from rich.table import Table

    table = Table(title="Separation scores (dB)", caption=report.label)
    table.add_column("method")
    table.add_column("target")
    table.add_column("tracks", justify="right")
    for c in COLUMNS:
        table.add_column(c, justify="right")
    for row in report.rows:
        table.add_row(row.method, row.target, str(row.tracks), *(_fmt(row.values[c]) for c in COLUMNS))
    return table


def plot_target(methods: list[MethodScores], target: str, agg: str, path: Path) -> Path:
    """A PNG box plot of per-track SDR of ``target``, one box per method."""
    # the object API with the Agg canvas: no pyplot, no global backend switch, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    frames_agg, tracks_agg = AGGREGATIONS[agg]
    names, data = [], []
    for m in methods:
        values = [v for v in per_track(m, target, "SDR", frames_agg).values() if not math.isnan(v)]
        if values:
            names.append(m.name)
            data.append(values)
    fig = Figure(figsize=(max(4.0, 1.2 * len(names) + 2), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.boxplot(data, showmeans=tracks_agg == "mean")
    for i, values in enumerate(data, start=1):  # every track as a dot: few tracks make a thin box
        ax.plot(np.full(len(values), i) + np.linspace(-0.08, 0.08, len(values)), values, ".", color="0.3", alpha=0.6)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20 if len(names) > 4 else 0)
    ax.set_ylabel("SDR (dB)")
    means = ", triangle: mean" if tracks_agg == "mean" else ""
    ax.set_title(f"{target}: BSSEval v4 SDR per track", fontsize=11)
    ax.set_xlabel(f"dot = one track ({frames_agg} over its 1 s frames); box over tracks (line: median{means})", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    with fileio.atomic(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    return path


def parse_method_spec(spec: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` or ``PATH`` (the method is then named after the folder)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        if not name:
            raise UsageError(None, f"{spec!r}: empty method name before '='")
        return name, Path(path)
    return None, Path(spec)


def make_report(specs: list[str], output: str | Path, agg: str = "median", plots: bool = True) -> Report:
    """Load each scores folder (``NAME=PATH`` or ``PATH``), aggregate, write CSV, Markdown and PNGs.

    Returns the :class:`Report`, its ``files`` the paths written. ``output`` is checked (not a
    scores folder, not around one; new, empty or a report folder) before anything is written.
    """
    check_choice(agg, AGGREGATIONS, "aggregation")
    output = Path(output)
    parsed = [parse_method_spec(spec) for spec in specs]
    fileio.check_disjoint(output, [path for _, path in parsed], "scores folder")
    methods = [load_method(path, name) for name, path in parsed]
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(None, f"two methods are named {', '.join(duplicates)}; name them with NAME=PATH")
    report = aggregate(methods, agg)
    for note in report.notes:
        warnings.warn(note, stacklevel=2)
    fileio.claim_folder(output, "report")
    written = []
    if plots:
        targets = canonical_order(t for m in methods for t in m.targets)
        written += [plot_target(methods, t, agg, fileio.safe_child(output, f"sdr_{t}.png", "target")) for t in targets]
    for stale in set(output.glob("sdr_*.png")) - set(written):  # plots of an earlier report in this folder
        try:
            stale.unlink()
        except OSError as exc:
            raise fileio.output_error(stale, exc) from exc
    report.files = [fileio.write_text(output / "report.csv", to_csv(report)),
                    fileio.write_text(output / "report.md", to_markdown(report, written)), *written]
    return report
