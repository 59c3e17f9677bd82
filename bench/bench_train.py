"""Training benchmark: what ``umxtools train`` learns in minutes on a CPU, and how fast it trains.

One run, on a freshly made toy dataset (``umxtools.toy``) in a temporary folder:

1. **quality** — ``umxtools train`` (the real command, in a subprocess, ``--time-limit``) trains
   a small UMX on vocals, a joint model (one UMX per target, all four targets) and the waveform
   model (Demucs v2) on vocals. Each separates the toy *test* tracks, and museval's SDR (median
   over 1 s windows, bss_eval v4) is compared, per track and target, with the mixture taken as
   the estimate (the baseline to beat) and with the oracle ideal ratio mask (IRM1: ``|S_j| /
   sum_k |S_k|`` on the mixture STFT, the ceiling of a magnitude-mask model). Separation is
   inline and simple (``umxtools separate`` is another command): spectrogram models' magnitudes
   take the mixture's phase (open-unmix's ``niter=0`` without the soft mask), the waveform model
   runs on the whole track.
2. **throughput** — training steps of the same UMX (hidden size, batch, excerpt length) fed by
   open-unmix's own on-the-fly loader (``openunmix.data.MUSDBDataset`` + its STFT, what
   ``scripts/train.py`` does) and by the cache (``RandomDataset`` through ``CacheLoader``), with
   0 and 2 loader workers each: samples per second, and the share of step time spent waiting
   for data. Same machine, same run.

The JSON written to ``--out`` holds every number; the closing table prints the SDR margins and the
throughput ratios. Run on an idle machine (``machine.load_avg_*`` tells whether it was).

    python bench/bench_train.py --out results/bench_train.json                       # about 25 min on 2 cores
    python bench/bench_train.py --tracks 3 --seconds 8 --minutes 0.1 --steps 1 \\
        --tp-hidden-size 32 --tp-seq-dur 2 --tp-batch-size 4 --out /tmp/b.json       # a quick check
"""

from __future__ import annotations

from results_io import write_json  # bench/ is on sys.path when run as a script

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np
import soundfile as sf
import torch
from rich.console import Console
from rich.table import Table

import umxtools
from umxtools import transforms
from umxtools.batching import CacheLoader
from umxtools.loaders import RandomDataset
from umxtools.models import OpenUnmix, load_class
from umxtools.toy import STEMS, make_toy_dataset
from umxtools.transforms import bandwidth_to_max_bin

REPO = Path(__file__).resolve().parents[1]
SUPPORT = REPO / "tests" / "support"  # the torchaudio stand-in that lets openunmix import beside our CPU torch
SEED = 42
N_FFT, N_HOP = 4096, 1024

console = Console(stderr=True)


# --- helpers ------------------------------------------------------------------------------------


def umx(*args: str, threads: int | None = None) -> str:
    """Run ``umxtools ARGS`` with this interpreter; its stdout."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, "-m", "umxtools", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise click.ClickException(f"umxtools {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "processor": platform.processor(),
            "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()]}




def read_track(folder: Path) -> dict[str, np.ndarray]:
    """Every stem and the mixture of a toy track, ``(channels, samples)`` float32."""
    return {name: sf.read(folder / f"{name}.wav", dtype="float32")[0].T.copy() for name in (*STEMS, "mixture")}


# --- quality ------------------------------------------------------------------------------------


def separate(folder: Path, mix: np.ndarray) -> dict[str, np.ndarray]:
    """Estimates ``{target: (channels, samples)}`` of the model in ``folder`` (umxtools' files)."""
    x = torch.from_numpy(mix)
    if (folder / "model.json").exists():
        meta = json.loads((folder / "model.json").read_text())
        model = load_class(meta["class"])(**meta["args"])
        model.load_state_dict(torch.load(folder / meta["weights"], weights_only=True))
        targets, kind = meta["targets"], meta["kind"]
    else:  # single-target UMX runs: open-unmix's files
        sep = json.loads((folder / "separator.json").read_text())
        targets, kind = sep["targets"], "spectrogram"
        (target,) = targets
        args = json.loads((folder / f"{target}.json").read_text())["args"]
        model = OpenUnmix(nb_bins=sep["nfft"] // 2 + 1, nb_channels=sep["nb_channels"], hidden_size=args["hidden_size"],
                          nb_layers=args["nb_layers"], unidirectional=args["unidirectional"], max_bin=args["max_bin"])
        model.load_state_dict(torch.load(folder / f"{target}.pth", weights_only=True))
    model.eval()
    with torch.no_grad():
        if kind == "waveform":
            y = model(x[None])[0]  # (targets, channels, samples)
            return {t: y[k].numpy() for k, t in enumerate(targets)}
        spec = transforms.stft(x, N_FFT, N_HOP, center=True)  # (channels, bins, frames), the separator's STFT
        mag = model(spec.abs()[None])[0]
        if mag.dim() == 3:
            mag = mag[None]  # (targets, channels, bins, frames)
        phase = torch.exp(1j * spec.angle())
        return {t: transforms.istft(mag[k] * phase, N_FFT, N_HOP, center=True, length=x.shape[-1]).numpy()
                for k, t in enumerate(targets)}


def oracle_irm(track: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """IRM1 (sigsep's oracle): each stem's magnitude share of the mixture STFT."""
    mix = torch.from_numpy(track["mixture"])
    spec = transforms.stft(mix, N_FFT, N_HOP, center=True)
    mags = {s: transforms.stft(torch.from_numpy(track[s]), N_FFT, N_HOP, center=True).abs() for s in STEMS}
    total = sum(mags.values()) + 1e-10
    return {s: transforms.istft(spec * (m / total), N_FFT, N_HOP, center=True, length=mix.shape[-1]).numpy() for s, m in mags.items()}


def sdr(reference: np.ndarray, estimate: np.ndarray, rate: int) -> float:
    """museval (bss_eval v4) SDR of one source, median over 1 s windows (silent windows skipped)."""
    import museval

    values, _, _, _ = museval.evaluate(reference.T[None], estimate.T[None], win=rate, hop=rate)
    return float(np.nanmedian(values[0]))


def evaluate(test_root: Path, models: dict[str, Path], rate: int) -> dict:
    """Per track and target: SDR of each model, of the mixture, of the oracle IRM."""
    tracks = {}
    for folder in sorted(p for p in test_root.iterdir() if p.is_dir()):
        console.print(f"  evaluating {folder.name} ...", highlight=False)
        track = read_track(folder)
        irm = oracle_irm(track)
        rows = {s: {"mixture": sdr(track[s], track["mixture"], rate), "oracle_irm": sdr(track[s], irm[s], rate)} for s in STEMS}
        for name, model_folder in models.items():
            for target, estimate in separate(model_folder, track["mixture"]).items():
                rows[target][name] = sdr(track[target], estimate, rate)
        tracks[folder.name] = {s: {k: round(v, 3) for k, v in r.items()} for s, r in rows.items()}
    return tracks


def summarize_quality(tracks: dict, models: dict[str, list[str]], margin_db: float) -> dict:
    """Mean SDR over test tracks per model and target, and its margin over the mixture."""
    summary = {}
    for name, targets in models.items():
        per_target = {}
        for t in targets:
            model = [tracks[k][t][name] for k in tracks]
            mixture = [tracks[k][t]["mixture"] for k in tracks]
            irm = [tracks[k][t]["oracle_irm"] for k in tracks]
            gain = float(np.mean(model) - np.mean(mixture))
            per_target[t] = {"sdr": round(float(np.mean(model)), 3), "mixture": round(float(np.mean(mixture)), 3),
                             "oracle_irm": round(float(np.mean(irm)), 3), "margin_db": round(gain, 3),
                             "worst_track_margin_db": round(float(min(np.subtract(model, mixture))), 3),
                             "beats_mixture": gain >= margin_db}
        summary[name] = per_target
    return summary


def train_model(name: str, train_cache: Path, valid_cache: Path, out: Path, flags: list[str], minutes: float, threads: int) -> dict:
    """``umxtools train`` for ``minutes`` (``--time-limit``); its loss history and wall time."""
    console.print(f"training {name} for {minutes:g} min ...", highlight=False)
    start = time.perf_counter()
    umx("train", str(train_cache), "--valid", str(valid_cache), "-o", str(out), *flags, "--epochs", "100000",
        "--time-limit", str(minutes), "--seed", str(SEED), "-q", threads=threads)
    wall = time.perf_counter() - start
    if (out / "model.json").exists():
        training = json.loads((out / "model.json").read_text())["training"]
    else:  # a single-target UMX: open-unmix's <target>.json holds the same histories
        (target,) = json.loads((out / "separator.json").read_text())["targets"]
        training = json.loads((out / f"{target}.json").read_text())
    history = [float(v) for v in training["valid_loss_history"]]
    return {"flags": flags, "minutes": minutes, "wall_s": round(wall, 1), "epochs": training["epochs_trained"],
            "best_epoch": training["best_epoch"],
            "train_loss_first_last": [training["train_loss_history"][0], training["train_loss_history"][-1]],
            "valid_loss_first_best": [history[0], min(history)]}


# --- throughput -----------------------------------------------------------------------------------


def import_openunmix():
    if str(SUPPORT) not in sys.path:
        sys.path.insert(0, str(SUPPORT))
    import openunmix.data
    import openunmix.transforms

    return openunmix


def time_steps(batches, to_input, hidden_size: int, nb_steps: int, warmup: int) -> dict:
    """Samples/s of UMX training steps (Adam, MSE on magnitudes) and the share spent waiting for data.

    ``to_input`` turns a raw batch into magnitudes (the on-the-fly STFT); it counts as data time.
    """
    torch.manual_seed(SEED)
    model = OpenUnmix(nb_bins=N_FFT // 2 + 1, hidden_size=hidden_size, max_bin=bandwidth_to_max_bin(44100, N_FFT, 16000))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    samples = wait = total = 0.0
    for step in range(warmup + nb_steps):
        t0 = time.perf_counter()
        x, y = to_input(next(batches))
        t1 = time.perf_counter()
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        t2 = time.perf_counter()
        if step >= warmup:
            samples, wait, total = samples + x.shape[0], wait + (t1 - t0), total + (t2 - t0)
    return {"steps": nb_steps, "samples": int(samples), "seconds": round(total, 3), "samples_per_s": round(samples / total, 3),
            "data_wait_share": round(wait / total, 4)}


def endless(loader, set_epoch):
    epoch = 0
    while True:
        set_epoch(epoch)
        yield from loader
        epoch += 1


def throughput(root: Path, cache: Path, workers: list[int], hidden_size: int, seq_dur: float, batch_size: int, nb_steps: int) -> dict:
    """The same training step fed by open-unmix's on-the-fly loader and by the cache."""
    configs = {}
    try:
        openunmix = import_openunmix()
    except ImportError as exc:
        openunmix = None
        configs["openunmix_error"] = str(exc)
    for w in workers:
        if openunmix is not None:
            console.print(f"throughput: open-unmix MUSDBDataset, {w} workers ...", highlight=False)
            torch.manual_seed(SEED)
            dataset = openunmix.data.MUSDBDataset(
                target="vocals", root=str(root), is_wav=True, subsets="train", split="train", seq_duration=seq_dur,
                samples_per_track=64, source_augmentations=openunmix.data.aug_from_str(["gain", "channelswap"]),
                random_track_mix=True, seed=SEED)
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=w)
            encoder, _ = openunmix.transforms.make_filterbanks(n_fft=N_FFT, n_hop=N_HOP, center=False)
            norm = openunmix.transforms.ComplexNorm()

            def stft(batch, encoder=encoder, norm=norm):
                x, y = batch
                with torch.no_grad():
                    return norm(encoder(x)), norm(encoder(y))

            configs[f"openunmix_workers_{w}"] = time_steps(endless(loader, lambda e: None), stft, hidden_size, nb_steps, warmup=1)
        console.print(f"throughput: cache, {w} workers ...", highlight=False)
        dataset = RandomDataset(cache, "vocals", seq_dur=seq_dur, samples_per_track=64, seed=SEED)
        loader = CacheLoader(dataset, batch_size=batch_size, num_workers=w)
        batches = endless(loader, loader.sampler.set_epoch)
        configs[f"cache_workers_{w}"] = time_steps(batches, lambda b: b, hidden_size, nb_steps, warmup=max(1, w))
        batches.close()
    for w in workers:
        base, cache_run = configs.get(f"openunmix_workers_{w}"), configs[f"cache_workers_{w}"]
        if base:
            cache_run["ratio_to_openunmix"] = round(cache_run["samples_per_s"] / base["samples_per_s"], 2)
    return configs


# --- main -----------------------------------------------------------------------------------------


def print_summary(result: dict) -> None:
    table = Table(title="SDR on the toy test tracks (dB, mean over tracks; museval median over 1 s windows)")
    for column in ("model", "target", "model SDR", "mixture", "oracle IRM", "margin", "worst track", "clear margin"):
        table.add_column(column)
    for name, targets in result["quality"]["summary"].items():
        for t, r in targets.items():
            table.add_row(name, t, f"{r['sdr']:.2f}", f"{r['mixture']:.2f}", f"{r['oracle_irm']:.2f}", f"{r['margin_db']:+.2f}",
                          f"{r['worst_track_margin_db']:+.2f}", "yes" if r["beats_mixture"] else "NO")
    Console().print(table)
    table = Table(title=f"UMX training steps (hidden {result['settings']['tp_hidden_size']}, batch {result['settings']['tp_batch_size']}, "
                        f"{result['settings']['tp_seq_dur']} s excerpts)")
    for column in ("loader", "samples/s", "data wait", "x open-unmix"):
        table.add_column(column)
    for name, r in result["throughput"].items():
        if isinstance(r, dict):
            table.add_row(name, f"{r['samples_per_s']:.2f}", f"{100 * r['data_wait_share']:.0f}%",
                          f"{r.get('ratio_to_openunmix', 1.0):.1f}")
    Console().print(table)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("results/bench_train.json"), show_default=True)
@click.option("--tracks", type=click.IntRange(min=3), default=8, show_default=True, help="Toy train tracks (the last two validate).")
@click.option("--test-tracks", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--seconds", type=click.FloatRange(min=4), default=20.0, show_default=True, help="Length of each toy track.")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Training time of each model (UMX, joint, waveform).")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="torch threads of the training processes.")
@click.option("--margin-db", type=float, default=2.0, show_default=True, help="SDR margin over the mixture that counts as clear.")
@click.option("--steps", type=click.IntRange(min=1), default=4, show_default=True,
              help="Timed training steps per throughput configuration.")
@click.option("--tp-hidden-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Throughput: UMX hidden size (open-unmix's).")
@click.option("--tp-seq-dur", type=click.FloatRange(min=1), default=6.0, show_default=True, help="Throughput: excerpt length (s).")
@click.option("--tp-batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", default="0,2", show_default=True, help="Loader workers of the throughput configurations.")
@click.option("--skip-throughput", is_flag=True)
def main(out: Path, tracks: int, test_tracks: int, seconds: float, minutes: float, threads: int, margin_db: float, steps: int,
         tp_hidden_size: int, tp_seq_dur: float, tp_batch_size: int, workers: str, skip_throughput: bool) -> None:
    """Train UMX, joint and waveform models for minutes and score them on the toy test tracks; time training steps."""
    started = time.perf_counter()
    machine_start = machine()
    valid = [f"toy_{tracks - 2:03d}", f"toy_{tracks - 1:03d}"]
    # small models: what trains in minutes on two CPU cores (the lead's brief: "a small UMX")
    runs = {
        "umx": ["--target", "vocals", "--hidden-size", "128", "--seq-dur", "2", "--samples-per-track", "32", "--batch-size", "16",
                "--lr", "3e-3", "--valid-seq-dur", "4"],
        "joint": ["--targets", ",".join(STEMS), "--joint", "--hidden-size", "64", "--seq-dur", "2", "--samples-per-track", "32",
                  "--batch-size", "16", "--lr", "3e-3", "--valid-seq-dur", "4"],
        "waveform": ["--target", "vocals", "--model", "waveform", "--model-arg", "channels=16", "--model-arg", "depth=5",
                     "--model-arg", "lstm_layers=1", "--seq-dur", "2", "--samples-per-track", "32", "--batch-size", "8",
                     "--lr", "1e-3", "--loss", "l1", "--valid-seq-dur", "4"],
    }
    targets = {"umx": ["vocals"], "joint": list(STEMS), "waveform": ["vocals"]}
    settings = {"tracks": tracks, "test_tracks": test_tracks, "seconds": seconds, "valid_tracks": valid, "minutes": minutes,
                "threads": threads, "margin_db": margin_db, "seed": SEED, "toy_seed": 0, "steps": steps, "tp_hidden_size": tp_hidden_size,
                "tp_seq_dur": tp_seq_dur, "tp_batch_size": tp_batch_size, "workers": workers,
                "separation": "magnitude x mixture phase (spectrogram models); whole-track forward (waveform)"}
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        tmp = Path(tmp)
        root = tmp / "toy"
        console.print(f"toy dataset: {tracks} train + {test_tracks} test tracks of {seconds} s", highlight=False)
        make_toy_dataset(root, tracks=tracks, seconds=seconds, seed=0, test_tracks=test_tracks)
        caches = {}
        for split in ("train", "valid"):
            caches[split] = tmp / f"toy-{split}.h5"
            umx("cache", "musdb", str(root), "--is-wav", "--subsets", "train", "--split", split, "--valid-tracks", ",".join(valid),
                "-j", "2", "-q", "-o", str(caches[split]))
        trained, folders = {}, {}
        for name, flags in runs.items():
            folders[name] = tmp / "models" / name
            trained[name] = train_model(name, caches["train"], caches["valid"], folders[name], flags, minutes, threads)
        console.print("separating and evaluating the test tracks ...")
        per_track = evaluate(root / "test", folders, rate=44100)
        quality = {"training": trained, "tracks": per_track, "summary": summarize_quality(per_track, targets, margin_db)}
        tp = {} if skip_throughput else throughput(root, caches["train"], [int(w) for w in workers.split(",")], tp_hidden_size,
                                                    tp_seq_dur, tp_batch_size, steps)
    result = {
        "benchmark": "bench_train", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "umxtools_version": umxtools.__version__, "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "machine": {**machine_start, "load_avg_1_5_15_end": machine()["load_avg_1_5_15"]},
        "settings": settings, "quality": quality, "throughput": tp, "wall_s": round(time.perf_counter() - started, 1),
    }
    write_json(out, result)
    print_summary(result)
    click.echo(str(out))


if __name__ == "__main__":
    main()
