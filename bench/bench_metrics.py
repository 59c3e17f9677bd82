"""How much faster umxtools.metrics computes museval's BSSEval v4 scores, at equal scores.

One run measures, on the same synthetic tracks (4 targets, stereo, 44.1 kHz), seconds of audio
scored per second of wall time by

- ``museval``: ``museval.evaluate(references, estimates)`` (v4, 1 s windows and hops), and
- ``fast``: ``umxtools.metrics.evaluate`` with the same arguments,

for every track length in ``--seconds`` and every thread count in ``--threads``. Each measurement
runs in a fresh Python process (``--worker``), so that its peak resident memory (``ru_maxrss``)
is its own and its thread settings are set before numpy or torch load: ``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS`` pin museval's numpy/scipy (OpenBLAS) and torch's
MKL/OpenMP, and the fast worker also calls ``torch.set_num_threads``. Every worker writes its
scores; the JSON holds, per length and thread count, both rates, their ratio, both peak memories
and the largest score difference (NaN frames must coincide). Where CUDA is available the fast
backend is also timed on the GPU (the card is named); otherwise the JSON says there was none.

The tracks are umxtools' toy stems over a white noise floor (about a 16-bit recording's: without
it museval's own scores on the toy's exactly panned sources depend on rounding, see
docs/metrics.md) and estimates from a separation-like process: each reference smoothed by a
3-tap filter, plus 15 % of the other sources and noise 30 dB below the source.

    python bench/bench_metrics.py --out results/bench_metrics.json            # 60 s and 300 s, 1 and 2 threads
    python bench/bench_metrics.py --seconds 10 --repeats 1 --out /tmp/b.json  # quick check
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the worker imports umxtools from this checkout

RATE = 44100
TARGETS = 4
CHANNELS = 2
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# --- data ---------------------------------------------------------------------------------------


def make_track(seconds: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(targets, samples, channels)`` float32 references and estimates (see the module doc).

    Built in float32 and in place: a 300 s track is 0.4 GB per array."""
    from umxtools.toy import STEMS, synthesize_track

    nb_samples = round(seconds * RATE)
    stems = synthesize_track(seed, 0, nb_samples, RATE)
    rng = np.random.default_rng(seed)
    references = np.stack([stems.pop(name).T for name in STEMS])  # float32
    references += rng.standard_normal(references.shape, dtype=np.float32) * np.float32(1e-5)
    estimates = 0.6 * references
    estimates[:, 1:] += 0.3 * references[:, :-1]
    estimates[:, 2:] += 0.1 * references[:, :-2]
    leakage = references.sum(axis=0, keepdims=True)
    estimates += 0.15 * leakage
    estimates -= 0.15 * references
    del leakage
    power = np.square(references).mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    estimates += rng.standard_normal(references.shape, dtype=np.float32) * np.sqrt(power * 1e-3).astype(np.float32)
    return references, estimates


# --- the worker (one measurement, in its own process) -----------------------------------------


def _rss_mb(field: str) -> float:
    """VmRSS or VmHWM of this process in MB (Linux), NaN elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_worker(spec: dict) -> dict:
    """Time one backend on one track; write its scores to ``spec["scores"]``."""
    data = np.load(spec["data"])
    references, estimates = data["references"], data["estimates"]
    seconds = references.shape[1] / RATE
    if spec["backend"] == "museval":
        import museval

        def evaluate():
            return museval.evaluate(references, estimates)
    else:
        import torch

        from umxtools import metrics

        torch.set_num_threads(spec["threads"])
        device = spec["device"]
        if device == "cuda":
            references_in = torch.from_numpy(references).to(device)
            estimates_in = torch.from_numpy(estimates).to(device)
        else:
            references_in, estimates_in = references, estimates

        def evaluate():
            scores = metrics.bss_eval_v4(references_in, estimates_in)
            if device == "cuda":
                torch.cuda.synchronize()
            return tuple(np.asarray(scores[name].cpu() if hasattr(scores[name], "cpu") else scores[name])
                         for name in metrics.SCORES)

    rss_before = _rss_mb("VmRSS")
    runs = []
    for _ in range(spec["repeats"]):
        wall, cpu = time.perf_counter(), time.process_time()
        scores = evaluate()
        runs.append({"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)})
    np.save(spec["scores"], np.array(scores))
    result = {
        "runs": runs,
        "median_wall_s": statistics.median(run["wall_s"] for run in runs),
        "rss_before_mb": round(rss_before, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    result["audio_s_per_s"] = round(seconds / result["median_wall_s"], 3)
    if spec["backend"] == "fast":
        result["stages_s"] = _fast_stages(references_in, estimates_in)
        result["device"] = spec["device"]
    return result


def _fast_stages(references, estimates) -> dict:
    """Seconds in each stage of one more fast run: what bounds its speed."""
    import torch

    from umxtools import metrics, metrics_kernels

    spent = {}
    on_cuda = isinstance(references, torch.Tensor) and references.device.type == "cuda"

    def timed(name, function):
        def wrapper(*args, **kwargs):
            if on_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = function(*args, **kwargs)
            if on_cuda:
                torch.cuda.synchronize()
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
            return out
        return wrapper

    # each stage is patched where it is called from: metrics calls the first two, metrics_kernels._solve
    stages = {"_track_correlations": metrics, "_distortion_filters": metrics, "_solve": metrics_kernels}
    originals = {name: getattr(module, name) for name, module in stages.items()}
    metrics._track_correlations = timed("correlations", originals["_track_correlations"])
    metrics._distortion_filters = timed("filters", originals["_distortion_filters"])
    metrics_kernels._solve = timed("solve", originals["_solve"])
    try:
        start = time.perf_counter()
        metrics.bss_eval_v4(references, estimates)
        total = time.perf_counter() - start
    finally:
        for name, function in originals.items():
            setattr(stages[name], name, function)
    return {
        "whole_track_correlations": round(spent["correlations"], 3),
        "gram_solve": round(spent["solve"], 3),
        "gram_build": round(spent["filters"] - spent["solve"], 3),
        "frames": round(total - spent["correlations"] - spent["filters"], 3),
        "total": round(total, 3),
    }


# --- the parent -----------------------------------------------------------------------------


def measure(backend: str, data: Path, threads: int, repeats: int, scores: Path, device: str = "cpu") -> dict:
    spec = {"backend": backend, "data": str(data), "threads": threads, "repeats": repeats,
            "scores": str(scores), "device": device}
    env = dict(os.environ, **{name: str(threads) for name in THREAD_VARIABLES})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise click.ClickException(f"{backend} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(fast: np.ndarray, reference: np.ndarray) -> dict:
    """Largest absolute score difference (dB) over frames finite in both; NaN/inf agreement."""
    same_nan = bool(np.array_equal(np.isnan(fast), np.isnan(reference)))
    same_inf = bool(np.array_equal(np.isinf(fast), np.isinf(reference)))
    finite = np.isfinite(fast) & np.isfinite(reference)
    per_score = {name: float(np.abs(fast[i] - reference[i])[finite[i]].max(initial=0.0))
                 for i, name in enumerate(("sdr", "isr", "sir", "sar"))}
    return {"max_abs_diff_db": max(per_score.values()), "per_score": per_score,
            "nan_frames_equal": same_nan, "inf_frames_equal": same_inf, "frames": int(fast.shape[-1])}


def machine_info() -> dict:
    import importlib.metadata

    import scipy
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "museval": importlib.metadata.version("museval"),
        "torch": torch.__version__,
        "torch_blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }


def gpu_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "reason": "torch.cuda.is_available() is False on this machine: no GPU timing"}
    return {"available": True, "name": torch.cuda.get_device_name(0)}


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("results/bench_metrics.json"),
              show_default=True, help="JSON file to write.")
@click.option("--seconds", default="60,300", show_default=True, help="Track lengths, comma-separated.")
@click.option("--threads", default="1,2", show_default=True, help="CPU thread counts, comma-separated.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed runs per fast measurement.")
@click.option("--museval-repeats", type=click.IntRange(1), default=1, show_default=True,
              help="Timed runs per museval measurement (about 1 s per second of audio on one thread).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--worker", hidden=True, default=None)
def main(out, seconds, threads, repeats, museval_repeats, seed, worker):
    """Benchmark umxtools.metrics against museval (see the module docstring)."""
    if worker is not None:
        print(json.dumps(run_worker(json.loads(worker))))
        return
    lengths = [float(s) for s in seconds.split(",")]
    thread_counts = [int(t) for t in threads.split(",")]
    started = time.perf_counter()
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(),
        "settings": {"targets": TARGETS, "channels": CHANNELS, "rate": RATE, "window": RATE, "hop": RATE,
                     "seconds": lengths, "threads": thread_counts, "repeats": repeats,
                     "museval_repeats": museval_repeats, "seed": seed,
                     "thread_pinning": f"{', '.join(THREAD_VARIABLES)} set in each worker's environment; "
                                       "fast worker also torch.set_num_threads"},
        "gpu": gpu_info(),
        "tracks": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        tmp = Path(tmp)
        for length in lengths:
            data = tmp / f"track-{length:g}.npz"
            references, estimates = make_track(length, seed)
            np.savez(data, references=references, estimates=estimates)
            del references, estimates
            entry = {"seconds": length, "configs": []}
            for count in thread_counts:
                click.echo(f"{length:g} s, {count} thread(s): museval ...", err=True)
                slow = measure("museval", data, count, museval_repeats, tmp / "museval.npy")
                click.echo(f"{length:g} s, {count} thread(s): fast ...", err=True)
                fast = measure("fast", data, count, repeats, tmp / "fast.npy")
                entry["configs"].append({
                    "threads": count, "museval": slow, "fast": fast,
                    "ratio": round(fast["audio_s_per_s"] / slow["audio_s_per_s"], 2),
                    "scores": compare(np.load(tmp / "fast.npy"), np.load(tmp / "museval.npy")),
                })
            if result["gpu"]["available"]:
                click.echo(f"{length:g} s: fast on {result['gpu']['name']} ...", err=True)
                gpu = measure("fast", data, thread_counts[0], repeats, tmp / "gpu.npy", device="cuda")
                entry["gpu"] = {"fast": gpu, "scores": compare(np.load(tmp / "gpu.npy"), np.load(tmp / "museval.npy")),
                                "ratio_to_museval_last_threads": round(
                                    gpu["audio_s_per_s"] / entry["configs"][-1]["museval"]["audio_s_per_s"], 2)}
            result["tracks"].append(entry)
    result["machine"]["load_avg_1_5_15_end"] = [round(v, 2) for v in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(out)
    for entry in result["tracks"]:
        for config in entry["configs"]:
            click.echo(f"{entry['seconds']:g} s, {config['threads']} thread(s): museval "
                       f"{config['museval']['audio_s_per_s']} audio s/s, fast {config['fast']['audio_s_per_s']} "
                       f"audio s/s, ratio {config['ratio']}x, max |diff| {config['scores']['max_abs_diff_db']:.2e} dB, "
                       f"peak RSS {config['museval']['peak_rss_mb']:.0f} / {config['fast']['peak_rss_mb']:.0f} MB")
    click.echo(str(out))


if __name__ == "__main__":
    main()
