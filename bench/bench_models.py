"""The model families side by side: training speed, separation speed and memory against each
family's reference implementation, and toy-data SDR. Issue 16.

Parts (``--part``, comma-separated; default ``training,separation``):

- **training**: ``umxtools train`` (the real command, in a child process) of one small CPU
  configuration per family (:data:`TRAIN_MODELS`) on a toy cache made in a temporary folder, all
  with the same excerpts (``--seq-dur``), batch, target (vocals) and stereo input, for
  ``--epochs`` epochs without validation. Samples per second of the last epoch from the run's
  ``<run>.history.csv`` (the first epoch pays the warm-up), parameter count, the child's wall time
  and peak RSS.
- **separation**: a ``--seconds`` song (the shared MUSDB18 sample tiled, else seeded noise)
  separated into 4 targets by one random-weight model per family (:data:`SEPARATION_SIZES`), in
  two child processes with the same weights, umxtools's being the real command
  (``python -m umxtools separate SONG ... -o OUT -q``):

  - umx: umxtools on an open-unmix model folder; reference: openunmix's ``Separator`` (the child
    of bench_separate.py);
  - waveform: umxtools on a model folder (``--segment``); no reference: umxtools' Demucs v2
    leaves out v2's upsampling, and no package runs this model;
  - bsroformer, melroformer: umxtools on the MSST ``.ckpt`` + YAML (``--model-config``);
    reference: audio-separator's class with the same state dict under MSST's ``demix``
    (both restated or imported by tests/support);
  - htdemucs: umxtools on a model folder written from a demucs ``.th``; reference:
    ``demucs.apply.apply_model(shifts=0, split=True, overlap=0.25)`` on that ``.th`` read by
    demucs's own loader.

  Per side: processing seconds (umxtools: ``seconds`` of its ``separation.json``, the streamed
  separation plus writing; reference: the same span timed inside its child: model run plus
  writing float32 WAVs, reading and loading excluded), real-time factor (processing seconds /
  audio seconds), child wall time and peak RSS (``ru_maxrss`` from ``wait4``). Then the ratios
  (``speed``: reference RTF / umxtools RTF; ``memory``: reference RSS / umxtools RSS) and the
  largest absolute difference between the two sides' stems.
- **sdr** (not in the script's default parts; `make bench` runs `--part all`): median vocals SDR on the toy test split per family
  beside the oracle IRM2 and the mixture, as the Makefile's ``eval`` computes it (``separate
  --targets vocals --residual``, ``oracle``, ``eval --targets vocals,accompaniment``, then the
  median over tracks of the per-track median SDR, ``umxtools report``'s default). Model folders
  come from ``--sdr-model FAMILY=FOLDER``; the other families are trained here with
  :data:`TOY_TRAIN_FLAGS`.

Timings compare within one JSON only (same machine, same moment); ``machine.load_avg_*`` shows
whether something else ran meanwhile.

    python bench/bench_models.py --out results/bench_models.json                  # about 20 min on 2 cores
    python bench/bench_models.py --seconds 20 --epochs 1 --samples-per-track 2 --out /tmp/b.json   # a quick check
    python bench/bench_models.py --part sdr --sdr-model umx=models/toy-umx --out /tmp/sdr.json
"""

from __future__ import annotations

from bench_separate import _env, machine, make_input, max_abs_diff, openunmix_run, run_child  # bench/ is on sys.path
from bench_separate import make_model as make_umx_folder
from results_io import write_json

import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's umxtools (and tests/support), here and in the children (child_env)
FAMILIES = ("umx", "waveform", "bsroformer", "melroformer", "htdemucs")
RATE = 44100
SEPARATION_TARGETS = ["vocals", "drums", "bass", "other"]

# --- the configurations (edit here) ----------------------------------------------------------------

# --part training: `umxtools train` flags choosing each family's small CPU model. htdemucs's
# `segment` is set to --seq-dur when not given here (its segment is its training excerpt).
TRAIN_MODELS: dict[str, list[str]] = {
    "umx": ["--hidden-size", "128"],
    "waveform": ["--model", "waveform", "--model-arg", "channels=16", "--model-arg", "depth=4"],
    "bsroformer": ["--model", "bsroformer", "--model-arg", "dim=32", "--model-arg", "depth=1", "--model-arg", "heads=2",
                   "--model-arg", "dim_head=16"],
    "melroformer": ["--model", "melroformer", "--model-arg", "dim=32", "--model-arg", "depth=1", "--model-arg", "heads=2",
                    "--model-arg", "dim_head=16"],
    "htdemucs": ["--model", "htdemucs", "--model-arg", 'demucs_args={"channels": 16, "depth": 4, "t_layers": 1}'],
}

# --part separation: model constructor arguments per --size. "small" keeps a 10-minute song to
# a couple of minutes per side on 2 cores; "large" is published-scale (umxhq's hidden 512; Demucs
# v2's 64 channels, depth 6; RoFormers dim 384 depth 6 with MSST's default heads; demucs's
# htdemucs defaults), far slower on a CPU.
SEPARATION_SIZES: dict[str, dict[str, dict]] = {
    "small": {
        "umx": {"hidden_size": 128},
        "waveform": {"channels": 16, "depth": 4},
        "bsroformer": {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16},
        "melroformer": {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16},
        "htdemucs": {"segment": "39/5", "demucs_args": {"channels": 16, "depth": 4, "t_layers": 1}},
    },
    "large": {
        "umx": {"hidden_size": 512},
        "waveform": {"channels": 64, "depth": 6},
        "bsroformer": {"dim": 384, "depth": 6, "heads": 8, "dim_head": 64},
        "melroformer": {"dim": 384, "depth": 6, "heads": 8, "dim_head": 64},
        "htdemucs": {"segment": "39/5", "demucs_args": {}},  # demucs's htdemucs defaults (channels 48, t_layers 5)
    },
}
# the RoFormers' STFT and MSST inference settings, both sides: MSST's vocals BS-RoFormer config
# (hop 441, so the 8 s chunk is a whole number of hops); num_overlap 2 rather than its 4 halves the work
ROFORMER_STFT = {"stft_n_fft": 2048, "stft_hop_length": 441, "stft_win_length": 2048}
MSST_INFERENCE = {"chunk_size": 352800, "num_overlap": 2, "batch_size": 1}
# the waveform model has no segmenting rule of its own: umxtools separates it in cross-faded segments
WAVEFORM_SEGMENT = 10.0

# --part sdr: the flags each family is trained with on the toy (--sdr-tracks tracks of 8 s, the
# last two validate). umx: the Makefile's toy flags for 30 epochs. The waveform families: 2 s
# excerpts, validated on 2 s excerpts (as the roformers are separated: in chunks of their
# training length), lr 3e-3 after 10 warm-up steps, and the waveform L1 for the roformers (MSST's
# l1+cstft costs several times their step on a CPU; with l1+mrstft a toy BS-RoFormer stayed at
# the mixture's uSDR for 165 steps)
_WAVE = ["--seq-dur", "2", "--valid-seq-dur", "2", "--lr", "3e-3", "--warmup-steps", "10"]
TOY_TRAIN_FLAGS: dict[str, list[str]] = {
    "umx": ["--hidden-size", "128", "--seq-dur", "2", "--samples-per-track", "16", "--lr", "3e-3", "--epochs", "30"],
    "waveform": [*TRAIN_MODELS["waveform"], *_WAVE, "--samples-per-track", "4", "--batch-size", "8", "--epochs", "10"],
    "bsroformer": [*TRAIN_MODELS["bsroformer"], *_WAVE, "--loss", "l1", "--samples-per-track", "2", "--batch-size", "4",
                   "--epochs", "15"],
    "melroformer": [*TRAIN_MODELS["melroformer"], *_WAVE, "--loss", "l1", "--samples-per-track", "2", "--batch-size", "4",
                    "--epochs", "15"],
    "htdemucs": [*TRAIN_MODELS["htdemucs"], "--model-arg", "segment=2", *_WAVE, "--samples-per-track", "4", "--batch-size", "8",
                 "--epochs", "10"],
}
SDR_ORACLES = ("irm2", "mix")


def umx_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "umxtools", *map(str, args)]


def child_env(threads: int | None) -> dict:
    """bench_separate's environment (OMP_NUM_THREADS) with this checkout first on the path."""
    env = _env(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def parameter_count(folder: Path) -> int:
    from umxtools.models.loading import load_model

    model = load_model(folder, identity=False)
    return sum(p.numel() for m in model.modules() for p in m.parameters())


# --- training ----------------------------------------------------------------------------------------


def make_toy_cache(work: Path, tracks: int, seconds: float, seed: int, valid: str | None = None) -> dict[str, Path]:
    """The toy dataset and its caches: ``train`` (and ``valid`` when ``valid`` names tracks)."""
    work.mkdir(parents=True, exist_ok=True)
    toy = work / "toy"
    run_child(umx_cmd("toy", toy, "--tracks", tracks, "--seconds", seconds, "--seed", seed), child_env(None))
    caches = {"toy": toy}
    for split in ("train", "valid") if valid else ("train",):
        caches[split] = work / f"{split}.h5"
        flags = ["--split", split, "--valid-tracks", valid] if valid else ["--split", "train"]
        run_child(umx_cmd("cache", "musdb", toy, "--is-wav", "--subset", "train", *flags, "--jobs", 1, "--force", "-o", caches[split]),
                  child_env(None))
    return caches


def train_flags(family: str, seq_dur: float) -> list[str]:
    flags = list(TRAIN_MODELS[family])
    if family == "htdemucs" and not any(f.startswith("segment=") for f in flags):
        flags += ["--model-arg", f"segment={seq_dur:g}"]
    return flags


def read_history(folder: Path) -> list[dict]:
    (path,) = folder.glob("*.history.csv")  # one run per folder here
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if k in ("epoch", "seconds", "samples", "samples_per_s")} for row in csv.DictReader(f)]


def training_part(families: list[str], work: Path, s: dict) -> dict:
    caches = make_toy_cache(work, s["tracks"], s["toy_seconds"], s["seed"])
    common = ["--targets", "vocals", "--nb-channels", 2, "--seq-dur", s["seq_dur"], "--batch-size", s["batch_size"],
              "--samples-per-track", s["samples_per_track"], "--epochs", s["epochs"], "--seed", s["seed"], "-q", "--force"]
    out = {}
    for family in families:
        folder = work / f"train-{family}"
        flags = train_flags(family, s["seq_dur"])
        run = run_child(umx_cmd("train", caches["train"], "-o", folder, *flags, *common), child_env(s["threads"]))
        run.pop("stdout")
        history = read_history(folder)
        last = history[-1]
        out[family] = {"flags": flags, "parameters": parameter_count(folder), "samples_per_s": last["samples_per_s"],
                       "samples_per_epoch": int(last["samples"]), "epoch_s": last["seconds"],
                       "first_epoch_samples_per_s": history[0]["samples_per_s"], **run}
        click.echo(f"train {family:11s}: {last['samples_per_s']:.2f} samples/s (last epoch), {out[family]['parameters']:,} "
                   f"parameters, peak RSS {run['peak_rss_mb']:.0f} MB", err=True)
        shutil.rmtree(folder, ignore_errors=True)
    return out


# --- separation: the two sides' material -------------------------------------------------------------


def roformer_config(family: str, size: dict, path: Path) -> dict:
    """An MSST YAML config of a 4-stem stereo RoFormer; returns its ``model`` section."""
    import yaml

    model = {**size, **ROFORMER_STFT, "stereo": True, "num_stems": len(SEPARATION_TARGETS)}
    if family == "melroformer":
        model["sample_rate"] = RATE
        model.setdefault("num_bands", 60)  # MSST's default, written out: the config names the architecture by it
    else:
        from umxtools.models.bsroformer import DEFAULT_FREQS_PER_BANDS

        model.setdefault("freqs_per_bands", list(DEFAULT_FREQS_PER_BANDS))
    conf = {"audio": {"chunk_size": MSST_INFERENCE["chunk_size"], "num_channels": 2, "sample_rate": RATE},
            "model": model, "training": {"instruments": SEPARATION_TARGETS},
            "inference": {"batch_size": MSST_INFERENCE["batch_size"], "num_overlap": MSST_INFERENCE["num_overlap"]}}
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    return model


def make_material(family: str, size: dict, folder: Path, seed: int) -> dict:
    """The random-weight model of ``family``, as ``umx_args`` (separate's model flags) and
    ``reference`` (what the reference child is given, None where there is none)."""
    import torch

    from umxtools import model_folder
    from umxtools.models import foreign

    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    if family == "umx":
        umx = make_umx_folder(folder / "umx", SEPARATION_TARGETS, size["hidden_size"], seed)
        return {"umx_args": ["--model", umx], "reference": {"model": str(umx)}, "parameters": parameter_count(umx)}
    if family == "waveform":
        from umxtools.models.waveform import Demucs

        args = {"targets": SEPARATION_TARGETS, "nb_channels": 2, **size}
        module = Demucs(**args)
        spec = model_folder.ModelSpec("umxtools.models.waveform:Demucs", args, "waveform")
        torch.save(module.state_dict(), folder / "model.pth")
        model_folder.write_json(folder / model_folder.MODEL_JSON, model_folder.model_json(spec, SEPARATION_TARGETS, "model.pth", RATE, 2, None))
        return {"umx_args": ["--model", folder, "--segment", WAVEFORM_SEGMENT], "reference": None,
                "reference_absent": "umxtools' Demucs v2 leaves out v2's 2x upsampling: no other package runs this model",
                "parameters": sum(p.numel() for p in module.parameters())}
    if family in ("bsroformer", "melroformer"):
        from umxtools.msst import build_msst_model

        config, ckpt = folder / "config.yaml", folder / "model.ckpt"
        model_args = roformer_config(family, size, config)
        module = build_msst_model(config)
        torch.save(module.state_dict(), ckpt)
        return {"umx_args": ["--model", ckpt, "--model-config", config], "parameters": sum(p.numel() for p in module.parameters()),
                "reference": {"class": family, "model_args": model_args, "ckpt": str(ckpt), **MSST_INFERENCE}}
    if family == "htdemucs":
        from demucs.states import get_state

        from umxtools.models.htdemucs import HTDemucs

        inner = HTDemucs(SEPARATION_TARGETS, nb_channels=2, sample_rate=RATE, **size).demucs
        args, kwargs = inner._init_args_kwargs  # demucs's capture_init: what its serialize_model stores
        th = folder / "model.th"
        torch.save({"klass": type(inner), "args": args, "kwargs": kwargs, "training_args": {},
                    "state": get_state(inner, None, half=False)}, th)
        umx = foreign.write_model_folder(foreign.demucs_separation_model(th), folder / "folder")
        return {"umx_args": ["--model", umx], "reference": {"th": str(th)}, "parameters": sum(p.numel() for p in inner.parameters())}
    raise ValueError(family)


def umxtools_side(wav: Path, umx_args: list, out: Path, threads: int | None) -> dict:
    run = run_child(umx_cmd("separate", wav, *umx_args, "-o", out, "-q", "--force"), child_env(threads))
    folder = Path(run.pop("stdout").strip().splitlines()[-1])
    record = json.loads((folder / "separation.json").read_text())
    return {**run, "separate_s": record["seconds"], "folder": str(folder)}


def reference_side(family: str, wav: Path, reference: dict, out: Path, threads: int | None) -> dict:
    if family == "umx":
        return openunmix_run(wav, Path(reference["model"]), out, SEPARATION_TARGETS, 1, threads)
    cmd = [sys.executable, __file__, "_reference-child", family, str(wav), json.dumps(reference), str(out)]
    run = run_child(cmd, child_env(threads))
    inner = json.loads(run.pop("stdout").strip().splitlines()[-1])
    return {**run, **inner, "folder": str(out)}


def reference_child(family: str, wav: str, reference: str, out: str) -> None:
    """The reference, in its own process: demucs's apply_model, or audio-separator's RoFormer
    under MSST's demix; timed from the model run to the last stem written."""
    import torch

    ref = json.loads(reference)
    t0 = time.perf_counter()
    if family == "htdemucs":
        from demucs.apply import apply_model
        from demucs.states import load_model

        model = load_model(ref["th"]).eval()
        run = lambda mix: apply_model(model, mix[None], shifts=0, split=True, overlap=0.25, progress=False)[0]  # noqa: E731
    else:
        from tests.support.msst_reference import msst_demix
        from tests.support.roformer_reference import import_roformer_modules

        bs, mel = import_roformer_modules()
        cls = bs.BSRoformer if family == "bsroformer" else mel.MelBandRoformer
        args = ref["model_args"]
        if "freqs_per_bands" in args:
            args["freqs_per_bands"] = tuple(args["freqs_per_bands"])  # as MSST's !!python/tuple
        model = cls(**args)
        model.load_state_dict(torch.load(ref["ckpt"], map_location="cpu", weights_only=True))
        model.eval()
        run = lambda mix: msst_demix(model, mix, ref["chunk_size"], ref["num_overlap"], ref["batch_size"])  # noqa: E731
    audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    mix = torch.from_numpy(np.ascontiguousarray(audio.T))  # (channels, samples)
    t1 = time.perf_counter()
    with torch.no_grad():
        estimates = run(mix)  # (targets, channels, samples)
    Path(out).mkdir(parents=True, exist_ok=True)
    for j, name in enumerate(SEPARATION_TARGETS):
        sf.write(Path(out) / f"{name}.wav", estimates[j].T.numpy(), rate, subtype="FLOAT")
    t2 = time.perf_counter()
    print(json.dumps({"load_and_read_s": round(t1 - t0, 3), "separate_s": round(t2 - t1, 3)}))


def _summarise(runs: list[dict], seconds: float) -> dict:
    for r in runs:
        r["rtf"] = round(r["separate_s"] / seconds, 4)
        r.pop("folder", None)
    keys = ("separate_s", "wall_s", "rtf", "peak_rss_mb")
    return {"runs": runs, **{k: round(statistics.median(r[k] for r in runs), 4) for k in keys}}


def separation_part(families: list[str], work: Path, s: dict) -> dict:
    wav = work / "song.wav"
    song = make_input(wav, s["seconds"], s["seed"])
    secs = song["seconds"]
    out = {"input": {k: v for k, v in song.items() if k != "path"}, "families": {}}
    for family in families:
        size = SEPARATION_SIZES[s["size"]][family]
        material = make_material(family, size, work / f"model-{family}", s["seed"])
        sides = ("reference", "umxtools") if material["reference"] is not None else ("umxtools",)
        runs = {side: [] for side in sides}
        for rep in range(s["repeats"]):
            for side in sides:  # alternate, so drift in machine load hits both
                dest = work / f"{family}-{side}-{rep}"
                run = (reference_side(family, wav, material["reference"], dest, s["threads"]) if side == "reference"
                       else umxtools_side(wav, material["umx_args"], dest, s["threads"]))
                run["_folder"] = run["folder"]
                runs[side].append(run)
                click.echo(f"separate {family:11s} {side:9s} run {rep}: {run['separate_s']:.2f} s "
                           f"(RTF {run['separate_s'] / secs:.3f}), wall {run['wall_s']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB", err=True)
        entry = {"size": size, "parameters": material["parameters"]}
        if "reference" in runs:
            diffs = max_abs_diff(Path(runs["umxtools"][-1]["_folder"]), Path(runs["reference"][-1]["_folder"]), SEPARATION_TARGETS)
        for side in sides:
            for r in runs[side]:
                shutil.rmtree(r.pop("_folder"), ignore_errors=True)
            entry[side] = _summarise(runs[side], secs)
        if "reference" in runs:
            u, r = entry["umxtools"], entry["reference"]
            entry["max_abs_diff"] = diffs
            entry["max_abs_diff_all"] = max(diffs.values())
            entry["ratios"] = {"speed": round(r["rtf"] / u["rtf"], 3), "memory": round(r["peak_rss_mb"] / u["peak_rss_mb"], 3)}
            click.echo(f"separate {family:11s}: speed x{entry['ratios']['speed']}, memory 1/{entry['ratios']['memory']}, "
                       f"max abs diff {entry['max_abs_diff_all']:.1e}", err=True)
        else:
            entry["reference"] = None
            entry["reference_absent"] = material["reference_absent"]
        out["families"][family] = entry
        shutil.rmtree(work / f"model-{family}", ignore_errors=True)
    wav.unlink()
    return out


# --- sdr --------------------------------------------------------------------------------------


def median_vocals_sdr(scores: Path, name: str) -> dict:
    """The median over tracks of each track's median vocals SDR, as ``umxtools report`` computes it."""
    from umxtools.report import aggregate, load_method

    (row,) = [r for r in aggregate([load_method(scores, name)], "median").rows if r.target == "vocals"]
    return {"median_sdr": round(float(row.values["SDR"]), 3), "tracks": row.tracks}


def sdr_part(families: list[str], work: Path, s: dict, given: dict[str, Path]) -> dict:
    threads, jobs = s["threads"], s["sdr_jobs"]
    if s["sdr_data"]:
        toy, caches = Path(s["sdr_data"]), None
    else:
        n = s["sdr_tracks"]
        caches = make_toy_cache(work / "sdr", n, s["sdr_toy_seconds"], s["seed"], f"toy_{n - 2:03d},toy_{n - 1:03d}")
        toy = caches["toy"]
    scored = ["--targets", "vocals,accompaniment"]
    out = {"data": str(toy) if s["sdr_data"] else "toy (made here)", "methods": {}}
    methods: dict[str, Path] = {}
    for family in families:
        if family in given:
            folder, how = given[family], {"model": str(given[family])}
        else:
            folder = work / "sdr" / f"model-{family}"
            flags = TOY_TRAIN_FLAGS[family] + ([] if s["sdr_epochs"] is None else ["--epochs", str(s["sdr_epochs"])])  # the last wins
            run = run_child(umx_cmd("train", caches["train"], "--valid", caches["valid"], "--targets", "vocals", "-o", folder,
                                    *flags, "--seed", s["seed"], "-q", "--force"), child_env(threads))
            how = {"trained_with": flags, "train_wall_s": run["wall_s"]}
        est = work / "sdr" / "estimates" / family
        run_child(umx_cmd("separate", toy / "test", "--model", folder, "--targets", "vocals", "--residual", "-o", est / "test", "-q"),
                  child_env(threads))
        methods[family] = est
        out["methods"][family] = how
    for oracle in SDR_ORACLES:
        est = work / "sdr" / "estimates" / oracle
        run_child(umx_cmd("oracle", "--musdb", toy, "--is-wav", "--method", oracle, *scored, "-o", est), child_env(threads))
        methods[oracle] = est
        out["methods"][oracle] = {"oracle": oracle}
    for name, est in methods.items():
        scores = work / "sdr" / "scores" / name
        run_child(umx_cmd("eval", est, "--musdb", toy, "--is-wav", *scored, "-o", scores, "--jobs", jobs, "-q"), child_env(threads))
        out["methods"][name].update(median_vocals_sdr(scores, name))
        click.echo(f"sdr {name:11s}: median vocals SDR {out['methods'][name]['median_sdr']:.2f} dB", err=True)
    return out


# --- the command ---------------------------------------------------------------------------------------

PARTS = ("training", "separation", "sdr")


def parse_parts(value: str) -> list[str]:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if "all" in parts:
        return list(PARTS)
    for p in parts:
        if p not in PARTS:
            raise click.BadParameter(f"{p!r}: one of {', '.join(PARTS)}, all")
    return parts


def parse_families(value: str) -> list[str]:
    names = [f.strip() for f in value.split(",") if f.strip()]
    for f in names:
        if f not in FAMILIES:
            raise click.BadParameter(f"{f!r}: one of {', '.join(FAMILIES)}")
    return names


@click.command()
@click.option("--part", "parts", default="training,separation", show_default=True,
              help="Comma-separated: training, separation, sdr, or all.")
@click.option("--families", default=",".join(FAMILIES), show_default=True, help="Comma-separated subset.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="OMP_NUM_THREADS of every child [default: torch's].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
# training
@click.option("--tracks", default=4, show_default=True, type=click.IntRange(min=1), help="Training: toy tracks.")
@click.option("--toy-seconds", default=8.0, show_default=True, type=click.FloatRange(min=1), help="Training: toy track length.")
@click.option("--seq-dur", default=2.0, show_default=True, type=click.FloatRange(min=0.5), help="Training excerpt (s).")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--samples-per-track", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(min=1), help="The last one is measured.")
# separation
@click.option("--seconds", default=600.0, show_default=True, type=click.FloatRange(min=1), help="Separation: song length.")
@click.option("--size", default="small", show_default=True, type=click.Choice(sorted(SEPARATION_SIZES)),
              help="Separation: model sizes (SEPARATION_SIZES).")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1), help="Separation: runs per side.")
# sdr
@click.option("--sdr-model", "sdr_models", multiple=True, metavar="FAMILY=FOLDER",
              help="SDR: a model folder trained elsewhere (repeatable); other families train with TOY_TRAIN_FLAGS.")
@click.option("--sdr-data", default=None, type=click.Path(file_okay=False, exists=True),
              help="SDR: a toy or MUSDB18-HQ root to score on [default: a fresh toy, --sdr-tracks tracks of 8 s].")
@click.option("--sdr-tracks", default=24, show_default=True, type=click.IntRange(min=3))
@click.option("--sdr-toy-seconds", default=8.0, show_default=True, type=click.FloatRange(min=1))
@click.option("--sdr-epochs", default=None, type=click.IntRange(min=1), help="SDR: epochs [default: TOY_TRAIN_FLAGS's].")
@click.option("--sdr-jobs", default=2, show_default=True, type=click.IntRange(min=1), help="SDR: umxtools eval --jobs.")
@click.option("--out", default="results/bench_models.json", show_default=True, type=click.Path(dir_okay=False, path_type=Path))
def main(parts: str, families: str, out: Path, sdr_models: tuple[str, ...], **settings) -> None:
    """Training speed, separation speed and memory against the references, and toy SDR, per model family."""
    chosen_parts, chosen = parse_parts(parts), parse_families(families)
    given = {}
    for spec in sdr_models:
        family, _, folder = spec.partition("=")
        if family not in FAMILIES or not folder:
            raise click.BadParameter(f"{spec!r}: FAMILY=FOLDER with FAMILY one of {', '.join(FAMILIES)}", param_hint="--sdr-model")
        given[family] = Path(folder)
    untrained = [f for f in chosen if f not in given]
    if "sdr" in chosen_parts and settings["sdr_data"] and untrained:
        raise click.UsageError(f"--sdr-data: models are trained here on the toy only; give --sdr-model for {', '.join(untrained)}")
    began = time.perf_counter()
    start_machine = machine()
    result = {"created": datetime.now(timezone.utc).isoformat(), "machine": start_machine,
              "settings": {**settings, "parts": chosen_parts, "families": chosen, "separation_targets": SEPARATION_TARGETS,
                           "train_models": {f: TRAIN_MODELS[f] for f in chosen},
                           "separation_sizes": {f: SEPARATION_SIZES[settings["size"]][f] for f in chosen},
                           "roformer_stft": ROFORMER_STFT, "msst_inference": MSST_INFERENCE, "waveform_segment": WAVEFORM_SEGMENT,
                           "toy_train_flags": {f: TOY_TRAIN_FLAGS[f] for f in chosen}, "sdr_models": {k: str(v) for k, v in given.items()}}}
    work = Path(tempfile.mkdtemp(prefix="bench-models-"))
    try:
        if "training" in chosen_parts:
            result["training"] = training_part(chosen, work / "training", settings)
        if "separation" in chosen_parts:
            (work / "separation").mkdir()
            result["separation"] = separation_part(chosen, work / "separation", settings)
        if "sdr" in chosen_parts:
            result["sdr"] = sdr_part(chosen, work, settings, given)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_avg_1_5_15_end"] = machine()["load_avg_1_5_15"]
    result["wall_s"] = round(time.perf_counter() - began, 1)
    write_json(out, result)
    click.echo(str(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_reference-child":
        reference_child(*sys.argv[2:6])
    else:
        main()
