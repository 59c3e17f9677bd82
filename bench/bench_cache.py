"""How much faster the cache feeds training than open-unmix's on-the-fly loading.

One run, on a freshly made toy dataset (``umxtools.toy``), measures *model-ready pairs per second*:
a pair is the magnitude spectrogram of a training mixture ``x`` and of its target ``y``, each
``(channels, bins, frames)``, the input open-unmix's model and loss take.

- baseline: open-unmix's ``MUSDBDataset`` (random excerpts, per-source gain and channel swap,
  random track mix) through a DataLoader with 0 workers, then its STFT and ``ComplexNorm`` on
  ``x`` and ``y``: what ``openunmix/train.py`` does every step.
- cache: ``umxtools cache musdb`` builds an HDF5 cache once (timed), then ``RandomDataset`` (the
  same sampling semantics, drawn in the STFT domain) through umxtools' batch loader
  (``batching.CacheLoader``) with 0 and 2 workers.

Each timing is repeated; the JSON written to ``--out`` holds every run, the medians and the ratio
of each cache configuration to the baseline measured in the same run. See bench/README.md.
"""

from __future__ import annotations

from results_io import write_json  # bench/ is on sys.path when run as a script

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import click
import torch
import torch.utils.data
from rich.console import Console
from rich.table import Table

import umxtools
from umxtools.loaders import RandomDataset
from umxtools.toy import make_toy_dataset

REPO = Path(__file__).resolve().parents[1]
# the torchaudio stand-in that lets openunmix import beside our CPU torch
SUPPORT = REPO / "tests" / "support"

# open-unmix's training defaults (openunmix/train.py), shared by the baseline and the cache
TARGET = "vocals"
SEQ_DUR = 6.0
SAMPLES_PER_TRACK = 64
SEED = 42
N_FFT, N_HOP = 4096, 1024
GAIN = (0.25, 1.25)
CACHE_WORKERS = (0, 2)
BUILD_JOBS = 2

console = Console()

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


# --- timing -----------------------------------------------------------------------------------


def time_pairs(batches: Batches, nb_pairs: int, to_model_input: Callable | None = None, warmup: int = 0) -> dict:
    """Pairs per second over the first ``nb_pairs`` pairs of ``batches`` after ``warmup`` batches.

    ``to_model_input`` turns a raw batch into magnitudes (the baseline's STFT); its cost is part
    of the timing, as it is part of every training step. Whole batches are timed, so the count
    is ``nb_pairs`` rounded up to a whole batch.
    """
    for _ in range(warmup):
        _model_input(next(batches), to_model_input)
    pairs = 0
    start = time.perf_counter()
    while pairs < nb_pairs:
        x, _ = _model_input(next(batches), to_model_input)
        pairs += x.shape[0]
    elapsed = time.perf_counter() - start
    return {"pairs": pairs, "seconds": round(elapsed, 4), "pairs_per_s": round(pairs / elapsed, 3)}


def _model_input(batch, to_model_input):
    x, y = batch
    return (x, y) if to_model_input is None else (to_model_input(x), to_model_input(y))


def summarize(runs: list[dict], key: str = "pairs_per_s") -> dict:
    return {"runs": runs, "median": round(statistics.median(r[key] for r in runs), 3)}


def endless(loader: torch.utils.data.DataLoader, set_epoch: Callable[[int], None], first_epoch: int) -> Batches:
    """Batches across as many epochs as a timing needs (a toy dataset may have few per epoch)."""
    epoch = first_epoch
    while True:
        set_epoch(epoch)
        yield from loader
        epoch += 1


# --- baseline: open-unmix's on-the-fly pipeline ------------------------------------------------


def import_openunmix():
    """``openunmix`` with the torchaudio stand-in first on ``sys.path``, or the ImportError."""
    if str(SUPPORT) not in sys.path:
        sys.path.insert(0, str(SUPPORT))
    try:
        import openunmix.data
        import openunmix.transforms
    except ImportError as exc:
        return exc
    return openunmix


def openunmix_baseline(root: Path, openunmix) -> tuple[torch.utils.data.Dataset, Callable]:
    """open-unmix's training dataset and its STFT + magnitude, as ``openunmix/train.py`` builds them."""
    dataset = openunmix.data.MUSDBDataset(
        target=TARGET, root=str(root), is_wav=True, subsets="train", split="train", seq_duration=SEQ_DUR,
        samples_per_track=SAMPLES_PER_TRACK, source_augmentations=openunmix.data.aug_from_str(["gain", "channelswap"]),
        random_track_mix=True, seed=SEED,
    )
    encoder, _ = openunmix.transforms.make_filterbanks(n_fft=N_FFT, n_hop=N_HOP, center=False)
    norm = openunmix.transforms.ComplexNorm()

    def magnitude(audio: torch.Tensor) -> torch.Tensor:
        # (batch, channels, samples) -> (batch, channels, bins, frames, 2) -> (batch, channels, bins, frames)
        return norm(encoder(audio))

    return dataset, magnitude


class MusdbBaseline(torch.utils.data.Dataset):
    """The same sampling written with musdb directly, for when openunmix cannot be imported.

    Follows ``openunmix.data.MUSDBDataset.__getitem__`` with ``random_track_mix=True`` and the
    ``gain`` and ``channelswap`` augmentations: every source from a random track at a random
    start, gain in [0.25, 1.25), channels swapped with probability 1/2; ``x`` is their sum.
    Items are ``(x, y)``, each ``(channels, samples)`` float32.
    """

    def __init__(self, root: Path):
        import musdb

        random.seed(SEED)
        self.mus = musdb.DB(root=str(root), is_wav=True, subsets="train", split="train")

    def __len__(self) -> int:
        return len(self.mus.tracks) * SAMPLES_PER_TRACK

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        stems = []
        for source in self.mus.setup["sources"]:
            track = random.choice(self.mus.tracks)
            track.chunk_duration = SEQ_DUR
            track.chunk_start = random.uniform(0, track.duration - SEQ_DUR)
            audio = torch.as_tensor(track.sources[source].audio.T, dtype=torch.float32)  # (channels, samples)
            audio = audio * (GAIN[0] + torch.rand(1) * (GAIN[1] - GAIN[0]))
            if audio.shape[0] == 2 and torch.rand(1) < 0.5:
                audio = torch.flip(audio, [0])
            stems.append(audio)
        target = list(self.mus.setup["sources"]).index(TARGET)
        return torch.stack(stems).sum(0), stems[target]


def musdb_magnitude(audio: torch.Tensor) -> torch.Tensor:
    """(batch, channels, samples) -> (batch, channels, bins, frames): open-unmix's TorchSTFT + ComplexNorm."""
    nb_samples, nb_channels, nb_timesteps = audio.shape
    window = torch.hann_window(N_FFT)
    spec = torch.stft(audio.reshape(-1, nb_timesteps), N_FFT, N_HOP, window=window, center=False, return_complex=True)
    return spec.abs().reshape(nb_samples, nb_channels, *spec.shape[-2:])


def bench_baseline(root: Path, kind: str, nb_pairs: int, repeats: int, batch_size: int) -> dict:
    """Pairs/s of the on-the-fly pipeline: open-unmix's own (``kind="auto"``/``"openunmix"``) or musdb's."""
    reason = None
    openunmix = import_openunmix() if kind in ("auto", "openunmix") else None
    if isinstance(openunmix, ImportError):
        if kind == "openunmix":
            raise click.ClickException(f"cannot import openunmix: {openunmix}")
        reason, openunmix = f"openunmix not importable: {openunmix}", None
    torch.manual_seed(SEED)  # the augmentations draw from torch's global generator
    if openunmix is not None:
        dataset, magnitude = openunmix_baseline(root, openunmix)
        name = "openunmix.data.MUSDBDataset"
    else:
        dataset, magnitude = MusdbBaseline(root), musdb_magnitude
        name = "musdb"
        reason = reason or "--baseline musdb"
    # shuffle as open-unmix's train.py does; its excerpts are random whatever the order
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)
    batches = endless(loader, lambda epoch: None, 0)
    with torch.no_grad():
        # one pair outside the timing: first-call costs (FFT plans, file handles), as the cache's warm-up batch
        x, y = dataset[0]
        magnitude(x[None])
        runs = [time_pairs(batches, nb_pairs, magnitude) for _ in range(repeats)]
        x, y = _model_input(next(batches), magnitude)
    return {"kind": name, "fallback_reason": reason, "num_workers": 0, "x_shape": list(x.shape), "y_shape": list(y.shape),
            **summarize(runs)}


# --- cache ------------------------------------------------------------------------------------


def umx(*args: str) -> str:
    """Run ``umxtools ARGS`` with this interpreter; its stdout."""
    done = subprocess.run([sys.executable, "-m", "umxtools", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"umxtools {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def bench_build(root: Path, out: Path, repeats: int) -> dict:
    """Seconds to build the cache with the CLI (``--force`` rebuilds; Python start-up included)."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        umx("cache", "musdb", str(root), "--is-wav", "--subsets", "train", "--split", "all", "-o", str(out),
            "-j", str(BUILD_JOBS), "--force", "-q")
        runs.append({"seconds": round(time.perf_counter() - start, 3)})
    info = json.loads(umx("cache", "info", str(out), "--json"))
    return {"build_jobs": BUILD_JOBS, "build_s": summarize(runs, "seconds"), "gb_per_hour": info["gb_per_hour"],
            "size_bytes": info["size_bytes"], "audio_seconds": info["duration_s"], "tracks": info["tracks"],
            "dtype": info["dtype"], "compression": info["compression"], "waveforms": info["waveforms"]}


def cache_loader(dataset: RandomDataset, batch_size: int, num_workers: int) -> tuple[object, str]:
    """umxtools' fast loader (shared-memory buffer ring) and its name, recorded in the JSON."""
    from umxtools.batching import CacheLoader

    return CacheLoader(dataset, batch_size=batch_size, num_workers=num_workers), "umxtools.batching.CacheLoader"


def bench_cache_loader(cache: Path, num_workers: int, nb_pairs: int, repeats: int, batch_size: int) -> dict:
    """Pairs/s of ``RandomDataset`` through umxtools' loader (magnitudes come out of the loader)."""
    dataset = RandomDataset(cache, TARGET, seq_dur=SEQ_DUR, samples_per_track=SAMPLES_PER_TRACK, random_track_mix=True,
                            gain=GAIN, channel_swap=True, seed=SEED)
    loader, name = cache_loader(dataset, batch_size, num_workers)
    runs = []
    for r in range(repeats):
        # a new epoch per repeat: other excerpts, so no repeat re-reads the same chunks.
        # Warm-up: the first batch takes the worker start-up; with W workers the first W batches
        # are assembled side by side and arrive together, so timing from the first would count
        # W - 1 batches as free. From the W-th on, the pipeline is in its steady state.
        batches = endless(loader, loader.sampler.set_epoch, first_epoch=1000 * r)
        runs.append(time_pairs(batches, nb_pairs, warmup=max(1, num_workers)))
        if r < repeats - 1:
            batches.close()  # stops the loader's iteration (and its workers, where they are per iteration)
    x, y = next(batches)
    shapes = {"x_shape": list(x.shape), "y_shape": list(y.shape)}
    del x, y
    batches.close()
    del batches, loader  # stop any persistent workers before the next configuration starts its own
    return {"loader": name, "num_workers": num_workers, **shapes, **summarize(runs)}


# --- report -----------------------------------------------------------------------------------


def machine() -> dict:
    """What the numbers depend on. The load average tells whether other work shared the CPUs:
    on a 2-core machine a busy neighbour slows torch's multi-threaded element-wise ops several-fold."""
    return {"cpu_count": os.cpu_count(), "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "processor": platform.processor(),
            "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()]}




def print_summary(result: dict) -> None:
    table = Table(title=f"model-ready pairs/s ({result['settings']['tracks']} toy tracks of {result['settings']['seconds']} s)")
    for column in ("configuration", "median", "runs", "x baseline"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    b = result["baseline"]
    table.add_row("baseline", f"{b['median']:.2f}", ", ".join(f"{r['pairs_per_s']:.2f}" for r in b["runs"]), "1.0")
    for name, c in result["configs"].items():
        table.add_row(name, f"{c['median']:.1f}", ", ".join(f"{r['pairs_per_s']:.1f}" for r in c["runs"]),
                      f"{c['ratio_to_baseline']:.1f}")
    console.print(table)
    console.print(f"baseline: {b['kind']}" + (f" ({b['fallback_reason']})" if b["fallback_reason"] else ""), highlight=False)
    c = result["cache"]
    console.print(f"cache build: {c['build_s']['median']:.1f} s median (-j {c['build_jobs']}), {c['size_bytes'] / 1e6:.1f} MB "
                  f"for {c['audio_seconds']:.0f} s of audio, {c['gb_per_hour']} GB per hour", highlight=False)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("results/bench_cache.json"), show_default=True)
@click.option("--tracks", type=click.IntRange(min=1), default=8, show_default=True, help="Toy train tracks.")
@click.option("--seconds", type=click.FloatRange(min=SEQ_DUR), default=20.0, show_default=True, help="Length of each toy track.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Runs of every timing.")
@click.option("--pairs", type=click.IntRange(min=1), default=32, show_default=True,
              help="Pairs timed per baseline run (the baseline gives about 1.4 pairs/s on 2 cores).")
@click.option("--cache-pairs", type=click.IntRange(min=1), default=320, show_default=True, help="Pairs timed per cache run.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--baseline", "baseline_kind", type=click.Choice(["auto", "openunmix", "musdb"]), default="auto", show_default=True,
              help="auto: open-unmix's MUSDBDataset, or the musdb rewrite if openunmix does not import.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads of the main process (baseline and 0-worker loader) [default: torch's].")
def main(out: Path, tracks: int, seconds: float, repeats: int, pairs: int, cache_pairs: int, batch_size: int,
         baseline_kind: str, threads: int | None) -> None:
    """Benchmark on-the-fly loading (open-unmix) against the HDF5 cache; write JSON to --out."""
    started = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    machine_start = machine()
    settings = {"tracks": tracks, "seconds": seconds, "repeats": repeats, "pairs": pairs, "cache_pairs": cache_pairs,
                "batch_size": batch_size, "target": TARGET, "seq_dur": SEQ_DUR, "samples_per_track": SAMPLES_PER_TRACK,
                "gain": list(GAIN), "channel_swap": True, "random_track_mix": True, "seed": SEED, "n_fft": N_FFT, "n_hop": N_HOP,
                "toy_seed": 0, "cache_build_jobs": BUILD_JOBS, "cache_workers": list(CACHE_WORKERS)}
    with tempfile.TemporaryDirectory(prefix="bench_cache-") as tmp:
        root, cache = Path(tmp) / "toy", Path(tmp) / "toy-train.h5"
        console.print(f"toy dataset: {tracks} tracks of {seconds} s", highlight=False)
        make_toy_dataset(root, tracks=tracks, seconds=seconds, seed=0)
        console.print("baseline (on the fly) ...")
        baseline = bench_baseline(root, baseline_kind, pairs, repeats, batch_size)
        console.print("cache build ...")
        built = bench_build(root, cache, repeats)
        configs = {}
        for workers in CACHE_WORKERS:
            console.print(f"cache loader, {workers} workers ...", highlight=False)
            c = bench_cache_loader(cache, workers, cache_pairs, repeats, batch_size)
            # the same model input on both sides, or the comparison would mean nothing
            assert c["x_shape"] == baseline["x_shape"] and c["y_shape"] == baseline["y_shape"], (c, baseline)
            c["ratio_to_baseline"] = round(c["median"] / baseline["median"], 2)
            configs[f"cache_workers_{workers}"] = c
    result = {
        "benchmark": "bench_cache", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "umxtools_version": umxtools.__version__, "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "machine": {**machine_start, "load_avg_1_5_15_end": machine()["load_avg_1_5_15"]},
        "settings": settings, "baseline": baseline, "configs": configs, "cache": built,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_json(out, result)
    print_summary(result)
    click.echo(str(out))


if __name__ == "__main__":
    main()
