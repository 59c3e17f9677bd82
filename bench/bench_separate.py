"""Separation speed and peak memory: ``umxtools separate`` against open-unmix's ``Separator``.

Both sides separate the same input with the same random-weight, umxhq-sized model folder (4
targets, hidden 512, 3 BLSTM layers, bandwidth 16 kHz, open-unmix's file layout) and the same
settings (niter 1, wiener_win_len 300, no softmask, no residual), each in its own child process:

- ``umxtools``: the real command, ``python -m umxtools separate INPUT --model FOLDER -o OUT -q``;
- ``openunmix``: ``openunmix.utils.load_separator(FOLDER)`` then ``Separator(audio)`` on the whole
  track under ``torch.no_grad``, stems written as float32 WAV with soundfile (what open-unmix's
  ``predict.separate`` + CLI do, minus torchaudio, which does not load beside the CPU torch here;
  the stand-in in tests/support makes openunmix importable).

Per run: the child's wall time (process start to exit, Python and torch start-up included), the
separation time measured inside the child (reading input, loading the model and start-up
excluded: ``Separator`` + writing for open-unmix, the streamed separation + writing recorded in
``separation.json`` for umxtools), audio seconds per second of each, and the child's peak
resident memory (``ru_maxrss`` of that child from ``wait4``). Then the largest absolute difference
between the two sides' stems, and the ratios (umxtools speed / open-unmix speed; open-unmix
memory / umxtools memory).

The input is the shared MUSDB18 sample (a real 7 s song) repeated to the requested length, or
seeded noise where the shared folder is absent. Timings are comparable only within one JSON (same
machine, same moment); ``machine.load_avg_*`` shows whether something else ran meanwhile. On a
shared machine pass ``--threads 1``: a multi-threaded batch-1 LSTM slows down several-fold when
another process takes a core (both sides run the same LSTMs, so their ratio is noise).
"""

from __future__ import annotations

from results_io import write_json  # bench/ is on sys.path when run as a script

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SUPPORT = REPO / "tests" / "support"  # the torchaudio stand-in that lets openunmix import
SAMPLE = REPO.parent / "shared" / "data" / "musdb-sample" / "hq" / "train" / "Music Delta - 80s Rock" / "mixture.wav"
RATE, N_FFT, N_HOP, BANDWIDTH = 44100, 4096, 1024, 16000


# --- material ------------------------------------------------------------------------------------


def make_model(folder: Path, targets: list[str], hidden: int, seed: int) -> Path:
    """An open-unmix model folder of random-weight UMX models (umxtools' class: same state dict)."""
    import torch

    from umxtools.models.umx import OpenUnmix
    from umxtools.transforms import bandwidth_to_max_bin

    folder.mkdir(parents=True, exist_ok=True)
    max_bin = bandwidth_to_max_bin(RATE, N_FFT, BANDWIDTH)
    for i, target in enumerate(targets):
        torch.manual_seed(seed + i)
        model = OpenUnmix(nb_bins=N_FFT // 2 + 1, nb_channels=2, hidden_size=hidden, max_bin=max_bin)
        torch.save(model.state_dict(), folder / f"{target}.pth")
        args = {"target": target, "nfft": N_FFT, "nhop": N_HOP, "nb_channels": 2, "hidden_size": hidden, "bandwidth": BANDWIDTH}
        (folder / f"{target}.json").write_text(json.dumps({"args": args, "rate": float(RATE)}))
    conf = {"targets": targets, "rate": float(RATE), "sample_rate": float(RATE), "nfft": N_FFT, "nhop": N_HOP, "nb_channels": 2}
    (folder / "separator.json").write_text(json.dumps(conf))
    return folder


def make_input(path: Path, seconds: float, seed: int) -> dict:
    """A float32 stereo WAV of ``seconds``: the shared real sample repeated, else seeded noise."""
    n = round(seconds * RATE)
    if SAMPLE.exists():
        song, _ = sf.read(SAMPLE, dtype="float32", always_2d=True)
        kind = f"{SAMPLE.parent.name} (MUSDB18 sample) repeated"
    else:
        song = (np.random.default_rng(seed).standard_normal((RATE * 7, 2)) * 0.1).astype(np.float32)
        kind = "seeded Gaussian noise (shared sample absent)"
    with sf.SoundFile(path, "w", RATE, 2, "FLOAT") as f:
        written = 0
        while written < n:
            part = song[: n - written]
            f.write(part)
            written += len(part)
    return {"path": str(path), "seconds": n / RATE, "kind": kind}


# --- children --------------------------------------------------------------------------------------


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; its wall time, exit code, peak RSS (this child only) and stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    # wait4 gives this child's own resource usage (RUSAGE_CHILDREN would add up every child)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close(), proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "stdout": out}


def umxtools_run(wav: Path, model: Path, out: Path, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "umxtools", "separate", str(wav), "--model", str(model), "-o", str(out), "-q", "--force"]
    run = run_child(cmd, _env(threads))
    folder = Path(run.pop("stdout").strip().splitlines()[-1])
    record = json.loads((folder / "separation.json").read_text())
    return {**run, "separate_s": record["seconds"], "folder": str(folder)}


def openunmix_run(wav: Path, model: Path, out: Path, targets: list[str], niter: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "_openunmix-child", str(wav), str(model), str(out), ",".join(targets), str(niter)]
    run = run_child(cmd, _env(threads))
    inner = json.loads(run.pop("stdout").strip().splitlines()[-1])
    return {**run, **inner, "folder": str(out)}


def _env(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def openunmix_child(wav: str, model: str, out: str, targets: str, niter: str) -> None:
    """The baseline, in its own process: what ``openunmix.predict.separate`` does, timed inside."""
    sys.path.insert(0, str(SUPPORT))
    import torch
    from openunmix import utils

    names = targets.split(",")
    t0 = time.perf_counter()
    separator = utils.load_separator(model, targets=names, niter=int(niter), residual=False, wiener_win_len=300,
                                     device="cpu", pretrained=True)
    separator.freeze()
    audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    x = utils.preprocess(torch.from_numpy(np.ascontiguousarray(audio.T)), rate, separator.sample_rate)
    t1 = time.perf_counter()
    with torch.no_grad():
        estimates = separator(x)  # (1, targets, channels, samples)
    Path(out).mkdir(parents=True, exist_ok=True)
    for j, name in enumerate(names):
        sf.write(Path(out) / f"{name}.wav", estimates[0, j].T.numpy(), rate, subtype="FLOAT")
    t2 = time.perf_counter()
    print(json.dumps({"load_and_read_s": round(t1 - t0, 3), "separate_s": round(t2 - t1, 3)}))


# --- comparison ------------------------------------------------------------------------------------


def max_abs_diff(ours: Path, theirs: Path, targets: list[str]) -> dict:
    """Largest |difference| per target between two folders of stems, read block by block."""
    diffs = {}
    for t in targets:
        with sf.SoundFile(ours / f"{t}.wav") as a, sf.SoundFile(theirs / f"{t}.wav") as b:
            if a.frames != b.frames:
                raise RuntimeError(f"{t}: {a.frames} frames against {b.frames}")
            d = 0.0
            for x, y in zip(a.blocks(1 << 20, dtype="float32"), b.blocks(1 << 20, dtype="float32")):
                d = max(d, float(np.abs(x - y).max()))
        diffs[t] = d
    return diffs


def machine() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "processor": platform.processor(),
            "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()]}




def _median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


@click.command()
@click.option("--seconds", default="60,600", show_default=True, help="Comma-separated input lengths.")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1), help="Runs per side and length.")
@click.option("--hidden", default=512, show_default=True, type=click.IntRange(min=2), help="UMX hidden size (umxhq: 512).")
@click.option("--targets", default="vocals,drums,bass,other", show_default=True)
@click.option("--niter", default=1, show_default=True, type=click.IntRange(min=0))
@click.option("--threads", default=None, type=click.IntRange(min=1), help="OMP_NUM_THREADS of both children [default: torch's].")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default="results/bench_separate.json", show_default=True, type=click.Path(dir_okay=False, path_type=Path))
def main(seconds: str, repeats: int, hidden: int, targets: str, niter: int, threads: int | None, seed: int, out: Path) -> None:
    """Speed (x real time) and peak RSS of umxtools separate against openunmix's Separator."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    lengths = [float(s) for s in seconds.split(",") if s.strip()]
    began = time.perf_counter()
    start_machine = machine()
    work = Path(tempfile.mkdtemp(prefix="bench-separate-"))
    results = []
    try:
        model = make_model(work / "model", names, hidden, seed)
        for secs in lengths:
            wav = work / f"mix_{secs:g}s.wav"
            info = make_input(wav, secs, seed)
            entry = {"input": {k: v for k, v in info.items() if k != "path"}, "umxtools": {"runs": []}, "openunmix": {"runs": []}}
            for rep in range(repeats):
                for side in ("openunmix", "umxtools"):  # alternate, so drift in machine load hits both
                    dest = work / f"{side}_{secs:g}_{rep}"
                    run = (openunmix_run(wav, model, dest, names, niter, threads) if side == "openunmix"
                           else umxtools_run(wav, model, dest, threads))
                    run["x_real_time"] = round(info["seconds"] / run["separate_s"], 3)
                    run["x_real_time_wall"] = round(info["seconds"] / run["wall_s"], 3)
                    entry[side]["runs"].append(run)
                    click.echo(f"{secs:g} s {side:9s} run {rep}: {run['separate_s']:.2f} s ({run['x_real_time']:.2f}x real time), "
                               f"wall {run['wall_s']:.2f} s, peak RSS {run['peak_rss_mb']:.0f} MB", err=True)
            diffs = max_abs_diff(Path(entry["umxtools"]["runs"][-1]["folder"]), Path(entry["openunmix"]["runs"][-1]["folder"]), names)
            for side in ("umxtools", "openunmix"):
                runs = entry[side]["runs"]
                for r in runs:
                    r.pop("folder")
                entry[side].update({k: _median(runs, k) for k in ("separate_s", "wall_s", "x_real_time", "x_real_time_wall", "peak_rss_mb")})
            entry["max_abs_diff"] = diffs
            entry["max_abs_diff_all"] = max(diffs.values())
            u, o = entry["umxtools"], entry["openunmix"]
            entry["ratios"] = {"speed": round(u["x_real_time"] / o["x_real_time"], 2),
                               "speed_wall": round(u["x_real_time_wall"] / o["x_real_time_wall"], 2),
                               "memory": round(o["peak_rss_mb"] / u["peak_rss_mb"], 2)}
            click.echo(f"{secs:g} s: speed x{entry['ratios']['speed']}, memory 1/{entry['ratios']['memory']}, "
                       f"max abs diff {entry['max_abs_diff_all']:.2e}", err=True)
            results.append(entry)
            for side in ("umxtools", "openunmix"):
                for rep in range(repeats):
                    shutil.rmtree(work / f"{side}_{secs:g}_{rep}", ignore_errors=True)
            wav.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "created": datetime.now(timezone.utc).isoformat(),
        "machine": {**start_machine, "load_avg_1_5_15_end": machine()["load_avg_1_5_15"]},
        "settings": {"seconds": lengths, "repeats": repeats, "hidden_size": hidden, "nb_layers": 3, "targets": names, "niter": niter,
                     "wiener_win_len": 300, "sample_rate": RATE, "n_fft": N_FFT, "n_hop": N_HOP, "bandwidth": BANDWIDTH,
                     "threads": threads, "seed": seed},
        "results": results,
        "wall_s": round(time.perf_counter() - began, 1),
    }
    write_json(out, result)
    click.echo(str(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_openunmix-child":
        openunmix_child(*sys.argv[2:7])
    else:
        main()
