"""How fast ``umxtools eval`` scores, against a plain loop over ``museval.eval_mus_track``.

One run, on a freshly made toy dataset (``umxtools.toy``, test tracks) and oracle IRM estimates of
it (``umxtools oracle --method irm2``: real separations, not noise), measures *seconds of audio
scored per second of wall time*:

- baseline: what museval's ``eval_mus_dir`` does, written out: for every musdb track, read its
  estimates with soundfile and call ``museval.eval_mus_track(track, estimates, output_dir=...)``;
- ``umxtools_jobs_1`` and ``umxtools_jobs_2``: ``umxtools.evaluation.evaluate_estimates`` into a
  fresh scores folder with 1 (in this process) and 2 worker processes, ``--backend museval``:
  the same arithmetic as the baseline, so the per-track JSONs must agree (``agree``);
- ``umxtools_fast_jobs_1``: the same with the default ``fast`` backend, end to end (reading the
  audio and writing the JSONs included). ``fast_scores`` holds its largest difference from
  museval's scores per metric. On the toy data only SDR is well posed: ISR/SIR/SAR come from a
  nearly singular solve there and differ by dB between museval runs with 1 and 2 BLAS threads
  (docs/eval.md); ``bench_metrics.py`` measures the backend alone on well-posed tracks.

Each timing is repeated; the JSON written to ``--out`` holds every run, the medians and each
configuration's ratio to the baseline of the same run.
"""

from __future__ import annotations

from results_io import write_json  # bench/ is on sys.path when run as a script

import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import musdb
import museval
import numpy as np
import simplejson
import soundfile as sf
from rich.console import Console
from rich.table import Table

import umxtools
from umxtools.evaluation import evaluate_estimates
from umxtools.oracle import write_oracle
from umxtools.references import MusdbReferences
from umxtools.toy import make_toy_dataset

JOBS = (1, 2)
METRICS = ("SDR", "SIR", "ISR", "SAR")
console = Console()


def bench_baseline(root: Path, estimates: Path, out: Path, targets: list[str]) -> dict:
    """museval's own loop: eval_mus_dir without its estimates listing, targets restricted."""
    start = time.perf_counter()
    seconds = 0.0
    for track in musdb.DB(root=str(root), is_wav=True, subsets="test").tracks:
        user = {t: sf.read(estimates / "test" / track.name / f"{t}.wav", always_2d=True)[0] for t in targets}
        museval.eval_mus_track(track, user, output_dir=str(out))
        seconds += track.duration
    elapsed = time.perf_counter() - start
    return {"seconds": round(elapsed, 3), "audio_s": round(seconds, 3), "audio_s_per_s": round(seconds / elapsed, 4)}


def bench_umxtools(root: Path, estimates: Path, out: Path, targets: list[str], jobs: int, backend: str = "museval") -> dict:
    start = time.perf_counter()
    summary = evaluate_estimates(estimates, MusdbReferences(str(root), is_wav=True, subset="test"), out, targets=targets,
                                 backend=backend, jobs=jobs, force=True)
    elapsed = time.perf_counter() - start
    assert not summary.failed, summary.failed
    return {"seconds": round(elapsed, 3), "audio_s": round(summary.seconds_scored, 3),
            "audio_s_per_s": round(summary.seconds_scored / elapsed, 4)}


def _frame_scores(path: Path) -> list[tuple[str, np.ndarray]]:
    """Per target of a score file: its name and its ``(frames, METRICS)`` float array."""
    targets = simplejson.loads(path.read_text(), allow_nan=True)["targets"]
    return [(t["name"], np.array([[f["metrics"][m] for m in METRICS] for f in t["frames"]], dtype=float))
            for t in targets]


def agree(baseline: Path, ours: Path) -> bool:
    """Every track's frame scores identical (to museval's 1e-5 quantisation)."""
    for path in sorted(baseline.glob("test/*.json")):
        for (name_a, x), (name_b, y) in zip(_frame_scores(path), _frame_scores(ours / "test" / path.name), strict=True):
            if name_a != name_b or x.shape != y.shape or not np.allclose(x, y, atol=1e-5, rtol=0, equal_nan=True):
                return False
    return True


def differences(baseline: Path, ours: Path) -> dict:
    """Largest absolute difference per metric over frames finite in both (dB), and whether NaN
    frames coincide: the fast backend against museval's files."""
    worst = {m: 0.0 for m in METRICS}
    same_nan = True
    for path in sorted(baseline.glob("test/*.json")):
        for (_, x), (_, y) in zip(_frame_scores(path), _frame_scores(ours / "test" / path.name), strict=True):
            same_nan &= bool(np.array_equal(np.isnan(x), np.isnan(y)))
            finite = np.isfinite(x) & np.isfinite(y)
            for i, m in enumerate(METRICS):
                worst[m] = max(worst[m], float(np.abs(x[:, i] - y[:, i])[finite[:, i]].max(initial=0.0)))
    return {"max_abs_diff_db": worst, "nan_frames_equal": same_nan}


def warm_up() -> None:
    """Pay first-call costs (lazy imports, FFT plans) outside the timings: 2 s of noise, 2 sources."""
    rng = np.random.default_rng(0)
    refs, ests = rng.standard_normal((2, 2, 88200, 2))
    museval.evaluate(list(refs), list(ests + refs), win=44100, hop=44100)


def summarize(runs: list[dict]) -> dict:
    return {"runs": runs, "median": round(statistics.median(r["audio_s_per_s"] for r in runs), 4)}


def machine() -> dict:
    """What the numbers depend on; the load average tells whether other work shared the CPUs."""
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "museval": museval.version._version,
            "blas_threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
            "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()]}




def print_summary(result: dict) -> None:
    s = result["settings"]
    table = Table(title=f"seconds of audio scored per second ({s['tracks']} toy tracks of {s['seconds']} s, {','.join(s['targets'])})")
    for column in ("configuration", "median", "runs", "x baseline"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    b = result["baseline"]
    table.add_row("museval loop", f"{b['median']:.3f}", ", ".join(f"{r['audio_s_per_s']:.3f}" for r in b["runs"]), "1.00")
    for name, c in result["configs"].items():
        table.add_row(name, f"{c['median']:.3f}", ", ".join(f"{r['audio_s_per_s']:.3f}" for r in c["runs"]),
                      f"{c['ratio_to_baseline']:.2f}")
    console.print(table)
    console.print(f"museval backend: scores agree with museval's: {result['agree']}", highlight=False)
    fast = result["fast_scores"]
    console.print("fast backend: largest difference from museval's scores (dB): "
                  + ", ".join(f"{m} {v:.2g}" for m, v in fast["max_abs_diff_db"].items())
                  + f"; NaN frames equal: {fast['nan_frames_equal']}", highlight=False)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("results/bench_eval.json"), show_default=True)
@click.option("--tracks", type=click.IntRange(min=1), default=4, show_default=True, help="Toy test tracks scored.")
@click.option("--seconds", type=click.FloatRange(min=1.0), default=10.0, show_default=True, help="Length of each toy track.")
@click.option("--targets", default="vocals,drums,bass,other", show_default=True, help="Comma-separated targets scored.")
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True, help="Runs of every timing.")
def main(out: Path, tracks: int, seconds: float, targets: str, repeats: int) -> None:
    """Benchmark umxtools eval (--jobs 1, 2) against a plain museval loop; write JSON to --out."""
    started = time.perf_counter()
    names = [t.strip() for t in targets.split(",") if t.strip()]
    machine_start = machine()
    settings = {"tracks": tracks, "seconds": seconds, "targets": names, "repeats": repeats, "jobs": list(JOBS),
                "estimates": "oracle irm2", "toy_seed": 0, "backend": "museval", "win_s": 1.0, "hop_s": 1.0}
    with tempfile.TemporaryDirectory(prefix="bench_eval-") as tmp:
        tmp = Path(tmp)
        root, estimates = tmp / "toy", tmp / "irm2"
        console.print(f"toy dataset: {tracks} test tracks of {seconds} s; oracle irm2 estimates", highlight=False)
        make_toy_dataset(root, tracks=1, seconds=seconds, seed=0, test_tracks=tracks)
        write_oracle(MusdbReferences(str(root), is_wav=True, subset="test"), "irm2", estimates, targets=names)
        warm_up()
        runs: dict[str, list[dict]] = {"baseline": [], **{f"umxtools_jobs_{j}": [] for j in JOBS}, "umxtools_fast_jobs_1": []}
        for r in range(repeats):  # interleaved, so a change of machine load hits every configuration
            console.print(f"run {r + 1}/{repeats}: museval loop ...", highlight=False)
            runs["baseline"].append(bench_baseline(root, estimates, tmp / "baseline", names))
            for j in JOBS:
                console.print(f"run {r + 1}/{repeats}: umxtools eval --jobs {j} ...", highlight=False)
                runs[f"umxtools_jobs_{j}"].append(bench_umxtools(root, estimates, tmp / f"jobs{j}", names, j))
            console.print(f"run {r + 1}/{repeats}: umxtools eval --backend fast ...", highlight=False)
            runs["umxtools_fast_jobs_1"].append(bench_umxtools(root, estimates, tmp / "fast", names, 1, backend="fast"))
        same = all(agree(tmp / "baseline", tmp / f"jobs{j}") for j in JOBS)
        fast = differences(tmp / "baseline", tmp / "fast")
    baseline = summarize(runs.pop("baseline"))
    configs = {}
    for name, config_runs in runs.items():
        configs[name] = summarize(config_runs)
        configs[name]["ratio_to_baseline"] = round(configs[name]["median"] / baseline["median"], 3)
    result = {
        "benchmark": "bench_eval", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "umxtools_version": umxtools.__version__, "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "machine": {**machine_start, "load_avg_1_5_15_end": machine()["load_avg_1_5_15"]},
        "settings": settings, "unit": "seconds of audio scored per second of wall time",
        "baseline": baseline, "configs": configs, "agree": same, "fast_scores": fast, "wall_s": round(time.perf_counter() - started, 1),
    }
    write_json(out, result)
    print_summary(result)
    console.print(str(out), highlight=False)


if __name__ == "__main__":
    main()
