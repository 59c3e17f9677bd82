"""The ``umxtools`` command line: thin Click commands over the library.

Each command parses flags, calls one library function and prints the path of the artifact it made
on stdout (so ``$(umxtools cache ...)`` works); progress and messages go to stderr. Library errors
become one line, ``umxtools: error: PATH: problem``, and exit code 1 (``--debug`` shows the
traceback); usage errors exit with 2 as Click's do; a command stopped by SIGTERM or SIGINT inside
:func:`umxtools.interrupts.interruptible` prints ``umxtools: stopped by SIGTERM; ...`` and exits
with 128 + the signal's number. Flags shared by several commands are the ``_..._option``
decorators below: one name, help text and default each.
"""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from umxtools import __version__, evaluation, oracle, pretrained, references, report, stems
from umxtools.errors import UmxError
from umxtools.interrupts import Interrupted
from umxtools.models import DEMUCS_NAMES, MODELS
from umxtools.progress import TrainProgress, counter_bar, file_bars, note, stderr


class _State:
    debug = False
    quiet = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="umxtools")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Music source separation research tools built on Open-Unmix."""
    _State.debug = debug


def main() -> None:
    warnings.showwarning = _one_line_warning
    try:
        cli.main(standalone_mode=False, prog_name="umxtools")
    except click.exceptions.Abort:
        stderr.print("umxtools: aborted", highlight=False)
        sys.exit(130)
    except Interrupted as exc:  # SIGTERM or SIGINT inside interruptible(): cleanup has run
        click.echo(f"umxtools: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        # one line, as every other error: Click's own form adds a usage block and a blank line
        command = exc.ctx.command_path if exc.ctx is not None else "umxtools"
        click.echo(f"umxtools: error: {exc.format_message()} (see '{command} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UmxError as exc:
        if _State.debug:
            raise
        click.echo(f"umxtools: error: {exc}", err=True)
        sys.exit(1)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"umxtools: warning: {message}", err=True)



def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


# --- flags shared by several commands: one decorator each, one name, one help text, one default ------


class _Option(click.Option):
    """A Click option with hidden alias names (``aliases``): they parse as the option does, and
    ``--help`` and error messages show only its other names. How a renamed flag keeps old
    scripts working without a second name in the vocabulary."""

    def __init__(self, param_decls, aliases: tuple[str, ...] = (), **attrs):
        super().__init__([*param_decls, *aliases], **attrs)
        self.aliases = tuple(aliases)

    @contextmanager
    def _shown(self):
        opts = self.opts
        self.opts = [o for o in opts if o not in self.aliases]
        try:
            yield
        finally:
            self.opts = opts

    def get_help_record(self, ctx):
        with self._shown():
            return super().get_help_record(ctx)

    def get_error_hint(self, ctx):
        with self._shown():
            return super().get_error_hint(ctx)


def _names(value) -> list[str]:
    """Repeated and comma-separated values of a flag, in order, each once."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return list(dict.fromkeys(v.strip() for item in values if item for v in item.split(",") if v.strip()))


def _stack(*options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def _subset_option(default: str, single: bool = False, dest: str = "subset"):
    """``--subset``: MUSDB18 subsets, repeatable or comma-separated (``--subsets``: hidden alias).

    The value is one subset's name, or with several the list (musdb.DB takes both). ``single``:
    the command handles one subset per run, and says so for more.
    """
    choices = list(references.MUSDB_SUBSETS)

    def check(ctx, param, value):
        names = _names(value)
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise click.BadParameter(f"{unknown[0]!r} is not a MUSDB18 subset ({', '.join(choices)})")
        if single and len(names) > 1:
            raise click.BadParameter(f"one subset per run (got {', '.join(names)}): run the command once per subset")
        return names[0] if len(names) == 1 else names

    text = "MUSDB18 subset, one per run." if single else "MUSDB18 subsets, repeatable or comma-separated."
    return click.option("--subset", dest, cls=_Option, aliases=("--subsets",), multiple=True, default=[default], show_default=True,
                        callback=check, metavar="|".join(choices), help=text)


def _targets_option(default: str, alias: bool = True):
    """``--targets``: repeatable or comma-separated (``--target``: hidden alias). The value is
    the comma-separated text (None when not given), which the commands split with ``_csv``."""

    def join(ctx, param, value):
        names = _names(value)
        return ",".join(names) if names else None

    return click.option("--targets", cls=_Option, aliases=("--target",) if alias else (), multiple=True, callback=join,
                        metavar="NAMES", help=f"Targets, repeatable or comma-separated [default: {default}].")


def _device_option(f):
    """``--device``: one default, ``auto``, for every command that runs a model."""

    def check(ctx, param, value):
        import re

        # the form only; the library says which of them it can use here (CUDA present, N in range)
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise click.BadParameter(f"{value!r} is not auto, cpu, cuda, cuda:N or mps")
        return value

    return click.option("--device", default="auto", show_default=True, callback=check,
                        help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps.")(f)


def _shard_option(items: str = "tracks"):
    """``--shard K/N``: every command that works on many tracks or files."""
    return click.option("--shard", default=None, metavar="K/N",
                        help=f"Only the {items} i (sorted by name) with i % N == K, one Slurm array task each.")


def _redo_option(f):
    """``--force`` of the track stages, which skip tracks whose outputs are complete."""
    return click.option("--force", is_flag=True, help="Redo tracks whose outputs are complete (a rerun skips them).")(f)


def _jobs_option(f):
    return click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
                        help="Worker processes, one track or file each at a time.")(f)


def _quiet_option(f):
    return click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but notes, warnings and errors (no progress, no summary).")(f)


def _references_options(f):
    """Where the true sources of ``eval`` and ``oracle`` come from: ``--musdb ROOT`` (with
    ``--is-wav``, ``--subset``) or ``--references DIR``."""
    return _stack(
        click.option("--musdb", "musdb_root", type=click.Path(file_okay=False, path_type=Path),
                      help="MUSDB18 root with the references (estimates in ESTIMATES/<subset>/<track>/<target>.wav)."),
        click.option("--is-wav", is_flag=True, help="--musdb is MUSDB18-HQ (track folders of wavs)."),
        _subset_option("test", single=True),
        click.option("--references", "references_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                     help="Folder of reference tracks DIR/<track>/<source>.wav (estimates in ESTIMATES/<track>/<target>.wav)."),
    )(f)


# --- toy -------------------------------------------------------------------------------------


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tracks", default=8, show_default=True, type=click.IntRange(min=1), help="Train tracks.")
@click.option("--test-tracks", default=None, type=click.IntRange(min=1), help="Test tracks [default: max(2, tracks // 4)].")
@click.option("--seconds", default=8.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Length of each track.")
@click.option("--seed", default=0, show_default=True, type=int)
def toy(out: Path, tracks: int, test_tracks: int | None, seconds: float, seed: int) -> None:
    """Write a synthetic MUSDB18-HQ-layout dataset (vocals, drums, bass, other, mixture)."""
    from umxtools.toy import make_toy_dataset

    make_toy_dataset(out, tracks=tracks, seconds=seconds, seed=seed, test_tracks=test_tracks)
    click.echo(str(out))


# --- cache -----------------------------------------------------------------------------------


@cli.group()
def cache() -> None:
    """Build, inspect, check and merge HDF5 spectrogram caches."""


def _cache_build_options(f):
    """Flags every cache-building command shares (storage, STFT, sharding, parallelism)."""
    from umxtools.cache import CHUNK_FRAMES, COMPRESSIONS, DTYPES

    options = [
        click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Cache file to write (.h5)."),
        click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True, help="Storage type of the STFT."),
        click.option("--compression", type=click.Choice(COMPRESSIONS), default="none", show_default=True,
                     help="HDF5 filter; 'none' reads fastest."),
        click.option("--chunk-frames", type=click.IntRange(min=1), default=CHUNK_FRAMES, show_default=True, help="STFT frames per HDF5 chunk."),
        click.option("--waveforms/--no-waveforms", default=True, show_default=True, help="Also store waveforms (time-domain models need them)."),
        click.option("--sample-rate", type=click.IntRange(min=1), default=44100, show_default=True),
        click.option("--nfft", type=click.IntRange(min=16), default=4096, show_default=True, help="STFT size."),
        click.option("--nhop", type=click.IntRange(min=1), default=1024, show_default=True, help="STFT hop."),
        click.option("--resample", is_flag=True, help="Resample audio at another rate instead of refusing it."),
        _shard_option("tracks"),  # joined by 'cache merge'
        _jobs_option,
        click.option("--force", is_flag=True, help="Replace an existing output file."),
        _quiet_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _build(refs, sources, meta, out, dtype, compression, chunk_frames, waveforms, sample_rate, nfft, nhop, resample, shard, jobs, force, quiet):
    from umxtools.cache import CacheOptions, Shard, build_cache
    from umxtools.transforms import STFTSettings

    options = CacheOptions(settings=STFTSettings(sample_rate=sample_rate, n_fft=nfft, n_hop=nhop), dtype=dtype,
                           compression=compression, chunk_frames=chunk_frames, waveforms=waveforms, resample=resample)
    with counter_bar(f"caching {out.name}", quiet) as progress:
        path = build_cache(refs, out, sources, options, meta=meta, shard=Shard.parse(shard), jobs=jobs, force=force,
                           command=["umxtools", *sys.argv[1:]], progress=progress, note=note)
    click.echo(str(path))


@cache.command("musdb")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--is-wav", is_flag=True, help="MUSDB18-HQ layout (track folders of wavs) instead of .stem.mp4.")
@_subset_option("train", dest="subsets")
@click.option("--split", type=click.Choice(["train", "valid", "all"]), default="train", show_default=True,
              help="musdb's train/valid split of the train subset ('all': no split).")
@click.option("--valid-tracks", default=None, help="Comma-separated track names forming the valid split (default: musdb's list).")
@_cache_build_options
def cache_musdb(root: Path, is_wav: bool, subsets: str, split: str, valid_tracks: str | None, **kw) -> None:
    """Cache MUSDB18 (.stem.mp4) or MUSDB18-HQ (--is-wav) through musdb's DB."""
    from umxtools.datasets import MUSDB_SOURCES, musdb_tracks

    split_arg = None if split == "all" or subsets == "test" else split
    refs = musdb_tracks(root, is_wav=is_wav, subsets=subsets, split=split_arg, valid_tracks=_csv(valid_tracks))
    meta = {"kind": "musdb", "root": str(root.resolve()), "is_wav": is_wav, "subsets": subsets, "split": split_arg,
            "valid_tracks": _csv(valid_tracks), "additive": True}
    _build(refs, list(MUSDB_SOURCES), meta, **kw)


@cache.command("folder")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--layout", type=click.Choice(["aligned", "sourcefolder", "trackfolder"]), required=True,
              help="aligned: TRACK/{input,output}; sourcefolder: SOURCE/*.wav; trackfolder: TRACK/SOURCE.wav.")
@click.option("--split", default=None, help="Use ROOT/SPLIT (open-unmix's train/valid subfolders).")
@click.option("--sources", default=None, help="Comma-separated sources (sourcefolder: folders; trackfolder: file stems) [default: all found].")
@click.option("--input-file", default="mixture.wav", show_default=True, help="aligned: input file name (glob).")
@click.option("--output-file", default="vocals.wav", show_default=True, help="aligned: output (target) file name (glob).")
@click.option("--mixture-file", default="mixture.wav", show_default=True, help="trackfolder: mixture file; summed from stems when absent.")
@click.option("--variable-sources", is_flag=True, help="trackfolder: tracks may lack some sources (silence).")
@_cache_build_options
def cache_folder(root: Path, layout: str, split: str | None, sources: str | None, input_file: str, output_file: str,
                 mixture_file: str, variable_sources: bool, **kw) -> None:
    """Cache a folder dataset in one of open-unmix's custom layouts."""
    from umxtools.datasets import folder_tracks

    base = root / split if split else root
    names = _csv(sources)
    refs = folder_tracks(base, layout, names, input_file, output_file, mixture_file, variable_sources)
    if layout == "aligned":
        cache_sources = [Path(output_file).stem]
    else:
        found = {role for r in refs for role in r.files if role != "mixture"}
        cache_sources = names or sorted(found)
    meta = {"kind": "folder", "layout": layout, "root": str(base.resolve()), "sources": cache_sources,
            "additive": layout != "aligned"}
    _build(refs, cache_sources, meta, **kw)


@cache.command("module")
@click.argument("spec", metavar="MODULE:CLASS")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Constructor argument (JSON value or string); repeatable.")
@_cache_build_options
def cache_module(spec: str, args: tuple[str, ...], **kw) -> None:
    """Cache a user's dataset class (see examples/template_dataset.py for the contract)."""
    from umxtools.datasets import module_tracks

    kwargs = {}
    for item in args:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--arg")
        key, value = item.split("=", 1)
        try:
            kwargs[key] = json.loads(value)
        except ValueError:
            kwargs[key] = value
    refs, sources = module_tracks(spec, kwargs)
    meta = {"kind": "module", "spec": spec, "args": kwargs, "additive": True}
    _build(refs, sources, meta, **kw)


@cache.command("info")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def cache_info(file: Path, as_json: bool) -> None:
    """Tracks, duration, sources, settings and size of a cache."""
    from umxtools.cache import cache_summary

    summary = cache_summary(file)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=str(file), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = dict(summary)
    rows["duration"] = f"{summary['duration_s'] / 60:.2f} min ({summary['duration_s']:.1f} s)"
    rows["size"] = f"{summary['size_bytes'] / 1e9:.3f} GB ({summary['gb_per_hour']} GB per hour of audio)"
    rows["stft"] = f"n_fft {summary['n_fft']}, hop {summary['n_hop']}, center {summary['center']}, {summary['sample_rate']} Hz"
    for key in ("path", "tracks", "duration", "sources", "stft", "dtype", "compression", "waveforms", "size", "shard", "dataset",
                "umxtools_version", "command"):
        value = rows[key]
        table.add_row(key, ", ".join(value) if isinstance(value, list) else json.dumps(value) if isinstance(value, dict) else str(value))
    Console().print(table)


@cache.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def cache_check(file: Path) -> None:
    """Verify every checksum, the statistics, that every track fits the cache's settings, and that
    the input files did not change since the build; print a one-line verdict."""
    from umxtools.cache import check_cache
    from umxtools.errors import CacheError

    report = check_cache(file)
    for p in report.problems:  # the report itself, on stdout; the verdict is the error line
        click.echo(f"{file}: {p}")
    for remark in report.notes:
        click.echo(f"{file}: note: {remark}")
    if not report.ok:
        raise CacheError(file, report.verdict)
    click.echo(f"{file}: {report.verdict}")


@cache.command("merge")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def cache_merge(out: Path, shards: tuple[Path, ...], force: bool) -> None:
    """Join shard caches (built with --shard K/N) and recompute the statistics."""
    from umxtools.cache import merge_caches

    click.echo(str(merge_caches(out, list(shards), force=force, command=["umxtools", *sys.argv[1:]])))


# --- train -----------------------------------------------------------------------------------


def _train_model_spec(ctx, param, value: str) -> str:
    from umxtools.models import MODELS  # torch-free registry

    if value not in MODELS and ":" not in value:
        raise click.BadParameter(f"{value!r} is neither {' nor '.join(repr(m) for m in MODELS)} nor MODULE:CLASS")
    return value


def _waveform_losses() -> list[str]:
    from umxtools.models import LOSSES  # torch-free registry

    return list(LOSSES["waveform"])


def _train_loss(ctx, param, value: str | None) -> str | None:
    from umxtools.losses import loss_terms  # torch-free

    if value is None:
        return None
    try:
        loss_terms(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _key_values(items: tuple[str, ...], flag: str) -> dict:
    """``KEY=VALUE`` flags; VALUE parsed as JSON when it parses (``4`` -> 4), else kept as text."""
    parsed = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=flag)
        key, value = item.split("=", 1)
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed


@cli.command()
@click.argument("cache", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--valid", "valid", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Validation cache (whole tracks are validated each epoch) [default: none: no validation, the last epoch's "
                   "weights are kept, no early stopping].")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Model folder to write.")
# --target (one target) stays, hidden: the train body tells it from --targets (both: an error)
@click.option("--target", default=None, hidden=True)
@_targets_option("vocals; a target may be a sum, drums+bass; several: with --joint, or waveform and custom models", alias=False)
@click.option("--joint", is_flag=True, help="One UMX per target in one model, loss summed over targets (OpenUnmixJoint).")
@click.option("--model", default="umx", callback=_train_model_spec,
              help=f"A family: {', '.join(MODELS)} (docs/models.md: Open-Unmix, Demucs v2, the RoFormers, HTDemucs), "
                   "or MODULE:CLASS / path/file.py:CLASS (see examples/template_model.py) "
                   "[default: umx; with --model-config the config's].")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="Constructor argument of a model other than umx (overrides --model-config's); repeatable.")
@click.option("--model-config", default=None, type=click.Path(dir_okay=False), metavar="CONFIG.yaml",
              help="An MSST (Music-Source-Separation-Training) YAML: the RoFormer family, its arguments and, unless given, "
                   "--targets, --nb-channels and --seq-dur; not its optimiser settings (see docs/train.md).")
@click.option("--nfft", type=click.IntRange(min=16), default=None, help="STFT size the cache must have [default: the cache's].")
@click.option("--nhop", type=click.IntRange(min=1), default=None, help="STFT hop the cache must have [default: the cache's].")
@click.option("--nb-channels", type=click.IntRange(1, 2), default=2, show_default=True, help="1: the model sees the channel mean.")
@click.option("--hidden-size", type=click.IntRange(min=1), default=512, show_default=True, help="UMX bottleneck width.")
@click.option("--nb-layers", type=click.IntRange(min=1), default=3, show_default=True, help="UMX LSTM layers.")
@click.option("--bandwidth", type=click.FloatRange(min=0, min_open=True), default=16000, show_default=True, help="UMX input bandwidth (Hz).")
@click.option("--unidirectional", is_flag=True, help="UMX: causal LSTM.")
@click.option("--seq-dur", type=click.FloatRange(min=0, min_open=True), default=6.0, show_default=True, help="Training excerpt length (s).")
@click.option("--valid-seq-dur", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Validation excerpt length (s); 0: whole tracks, as open-unmix.")
@click.option("--samples-per-track", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--source-augmentations", default="gain,channelswap", show_default=True, help="Comma-separated, or 'none'.")
@click.option("--random-track-mix/--no-random-track-mix", default=True, show_default=True, help="Each source from its own random track.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Per process.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-5, show_default=True)
@click.option("--lr-decay-patience", type=click.IntRange(min=0), default=80, show_default=True)
@click.option("--lr-decay-gamma", type=click.FloatRange(0, 1, min_open=True), default=0.3, show_default=True)
@click.option("--patience", type=click.IntRange(min=0), default=140, show_default=True, help="Early-stopping patience (epochs).")
@click.option("--epochs", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=42, show_default=True)
# the recipe flags default to None: the model family's (train_setup.RECIPES, docs/train.md); the
# choices mirror train_setup.OPTIMIZERS and LR_SCHEDULES (checked there again), as --amp's do
@click.option("--loss", default=None, callback=_train_loss,
              help=f"Waveform models' loss: one of {', '.join(_waveform_losses())} or a '+'-joined sum (l1+mrstft) "
                   "[default: the family's: l1; roformers l1+cstft, MSST's loss].")
@click.option("--optimizer", type=click.Choice(["adam", "adamw"]), default=None,
              help="[default: the family's: adam (umx, waveform, custom); adamw (roformers, htdemucs)].")
@click.option("--lr-schedule", type=click.Choice(["plateau", "cosine"]), default=None,
              help="plateau: open-unmix's per-epoch decay; cosine: per step to 0 at --epochs [default: the family's: "
                   "plateau (umx, waveform, custom); cosine (roformers, htdemucs)].")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Optimiser steps of linear learning-rate warm-up [default: the family's: 0; roformers 500].")
@click.option("--clip-grad-norm", type=click.FloatRange(min=0), default=None,
              help="Clip the gradient norm to this (0: off) [default: the family's: 0; roformers 1].")
@click.option("--accumulate", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batches whose gradients make one optimiser step.")
@click.option("--init-from", default=None, metavar="PATH|NAME",
              help="Start from these weights (those whose name and shape match): an open-unmix .pth or model folder, a "
                   "umxtools model folder, a demucs .th or name, an MSST .ckpt. Not with --resume.")
@click.option("--valid-metric", type=click.Choice(["loss", "sdr"]), default=None,
              help="What picks the best weights (and drives early stopping and the plateau decay): the validation loss, or "
                   "the mean uSDR over targets and tracks (waveform models) [default: the family's: loss (umx, waveform, "
                   "custom); sdr (roformers, htdemucs)].")
@click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True, metavar="DECAY",
              help="Also keep the weights' exponential moving average (DECAY per optimiser step; 0: off; e.g. 0.999 for "
                   "roformers), saved as ema.<run>.pth; separate --ema uses it.")
@click.option("--nb-workers", type=click.IntRange(min=0), default=0, show_default=True, help="Loader worker processes.")
# the precision list mirrors umxtools.training.AMP_DTYPES, written out so that `umxtools --help`
# does not import torch; the library checks it (and the device) again
@_device_option
@click.option("--amp", type=click.Choice(["bf16", "fp16"]), default=None,
              help="Mixed precision: the forward pass under torch.autocast (bf16 on CUDA or the CPU; fp16 on CUDA, with a "
                   "gradient scaler).")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MINUTES",
              help="Stop after the epoch that passes it (--resume continues).")
@click.option("--resume", is_flag=True, help="Continue the run in the output folder from its .chkpnt (a fresh start if there is none).")
@click.option("--force", is_flag=True, help="Replace another run in the output folder.")
@click.option("--allow-stale", is_flag=True, help="Use caches whose input files changed since they were built.")
@_quiet_option
def train(cache: Path, valid: Path | None, output: Path, target: str | None, targets: str | None, model_args: tuple[str, ...],
          source_augmentations: str, valid_seq_dur: float, quiet: bool, **flags) -> None:
    """Train a separation model on a cache (see docs/train.md); prints the model folder.

    Under `torchrun --nproc-per-node N -m umxtools train ...` it trains data-parallel.
    """
    from umxtools.distributed import from_env
    from umxtools.training import TrainConfig, train as train_model

    if target is not None and targets is not None:
        raise click.UsageError("give --target or --targets, not both")
    if flags["force"] and flags["resume"]:
        raise click.UsageError("--force and --resume exclude each other")
    names = _csv(targets) if targets is not None else [target or "vocals"]
    ctx = click.get_current_context()  # which flags a --model-config fills in: those left out
    given = [name for name in ("model", "nb_channels", "seq_dur") if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if targets is not None or target is not None:
        given.append("targets")
    augmentations = [] if source_augmentations.strip() == "none" else _csv(source_augmentations)
    config = TrainConfig(cache=cache, valid=valid, output=output, targets=tuple(names), source_augmentations=tuple(augmentations),
                         model_args=_key_values(model_args, "--model-arg"), valid_seq_dur=valid_seq_dur or None,
                         command=["umxtools", *sys.argv[1:]], given=tuple(given), **flags)
    rank = from_env().rank
    try:
        if rank != 0:
            path = train_model(config)
        else:
            with TrainProgress(quiet) as progress:
                path = train_model(config, progress)
    except UmxError:
        if rank != 0:
            sys.exit(1)  # every rank meets the same error: rank 0 alone reports it
        raise
    if rank == 0:
        click.echo(str(path))


# --- eval, oracle, report (docs/eval.md) -----------------------------------------------------


def _references(musdb_root: Path | None, is_wav: bool, subset: str, folder: Path | None):
    """The references of eval and oracle: a MUSDB18 root through musdb, or a folder of tracks."""
    from umxtools.references import FolderReferences, MusdbReferences

    if (musdb_root is None) == (folder is None):
        raise click.UsageError("give the references: --musdb ROOT or --references DIR (one of them)")
    if folder is not None:
        if is_wav:
            raise click.UsageError("--is-wav goes with --musdb")
        return FolderReferences(str(folder))
    return MusdbReferences(str(musdb_root), is_wav=is_wav, subset=subset)


@cli.command("eval")
@click.argument("estimates", type=click.Path(file_okay=False, path_type=Path))
@_references_options
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Scores folder: one museval JSON per track.")
@_targets_option("every target with estimates")
@click.option("--backend", type=click.Choice(list(evaluation.BACKENDS)), default=evaluation.DEFAULT_BACKEND,
              show_default=True, help="Scoring backend: fast (umxtools.metrics, museval's numbers within 0.01 dB) or museval itself.")
@_jobs_option
@_shard_option("tracks")
@_redo_option
@_quiet_option
def eval_command(estimates: Path, musdb_root: Path | None, is_wav: bool, subset: str, references_dir: Path | None, output: Path,
                 targets: str | None, backend: str, jobs: int, shard: str | None, force: bool, quiet: bool) -> None:
    """Score estimates with museval's BSSEval v4 (1 s frames) and the MDX whole-track SDR (uSDR).

    Prints the scores folder on stdout when every track of the run has its scores; SIGTERM or
    Ctrl-C stop it cleanly (exit 143, 130) and a rerun continues.
    """
    from umxtools.cache import Shard
    from umxtools.evaluation import evaluate_estimates
    from umxtools.interrupts import interruptible

    references = _references(musdb_root, is_wav, subset, references_dir)
    with interruptible(), counter_bar(f"scoring {estimates.name}", quiet) as progress:
        summary = evaluate_estimates(estimates, references, output, targets=_csv(targets), backend=backend, jobs=jobs,
                                     shard=Shard.parse(shard), force=force, progress=progress)
    for error in summary.failed:  # per-track problems: the other tracks' scores are written
        click.echo(f"umxtools: error: {error}", err=True)
    if summary.failed:
        sys.exit(1)  # stdout names an artifact only when it is complete
    click.echo(str(output))
    if not quiet:
        click.echo(f"scored {len(summary.scored)} track(s) ({summary.seconds_scored:.1f} s of audio), "
                   f"{len(summary.skipped)} already scored; targets {', '.join(summary.targets)}", err=True)


@cli.command("oracle")
@click.argument("root", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--method", type=click.Choice(list(oracle.METHODS)), required=True,
              help="mix: mixture/J; irm1, irm2: ratio masks (magnitude, power); ibm: binary mask; mwf: multichannel Wiener.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Estimates folder to write.")
@_references_options
# the flag of umxtools <= 0.1's oracle (ROOT is a references folder): parsed, hidden, deprecated
@click.option("--folder", is_flag=True, hidden=True)
@_targets_option("every source and accompaniment")
@_shard_option("tracks")
@click.option("--force", is_flag=True,
              help="Redo tracks whose estimates are complete; replace another method's estimates in a folder oracle made "
                   "(never a folder of anything else).")
@_quiet_option
def oracle_command(root: Path | None, method: str, output: Path, musdb_root: Path | None, is_wav: bool, subset: str,
                   references_dir: Path | None, folder: bool, targets: str | None, shard: str | None, force: bool, quiet: bool) -> None:
    """Write oracle (mask from the true sources) or mixture estimates, ready for `umxtools eval`.

    The references: --musdb ROOT (ROOT alone means the same) or --references DIR. A rerun skips
    tracks that are complete; SIGTERM or Ctrl-C stop it cleanly (exit 143, 130).
    """
    from umxtools.cache import Shard
    from umxtools.interrupts import interruptible
    from umxtools.oracle import write_oracle

    if root is not None:
        if musdb_root is not None or references_dir is not None:
            raise click.UsageError("give the references once: ROOT, --musdb ROOT or --references DIR")
        if folder:
            click.echo("umxtools: warning: --folder is deprecated: use --references ROOT", err=True)
            references_dir = root
        else:
            musdb_root = root
    elif folder:
        raise click.UsageError("--folder (deprecated) goes with ROOT; use --references DIR")
    references = _references(musdb_root, is_wav, subset, references_dir)
    with interruptible(), counter_bar(f"oracle {method}", quiet) as progress:
        summary = write_oracle(references, method, output, targets=_csv(targets), shard=Shard.parse(shard), force=force,
                               progress=progress)
    for error in summary.failed:  # tracks another process is writing: the other tracks are written
        click.echo(f"umxtools: error: {error}", err=True)
    if summary.failed:
        sys.exit(1)
    click.echo(str(output))
    if not quiet:
        click.echo(f"wrote {len(summary.written)} track(s), {len(summary.skipped)} already complete (--force redoes them)", err=True)


@cli.command("report")
@click.argument("scores", nargs=-1, required=True, metavar="[NAME=]SCORES...")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Report folder (report.csv, report.md, sdr_<target>.png): new, empty or an earlier report's.")
@click.option("--agg", type=click.Choice(list(report.AGGREGATIONS)), default="median", show_default=True,
              help="median: over frames then tracks (SiSEC); mean: both means; mean-of-medians: median over frames, mean over tracks.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write the SDR box plots.")
@_quiet_option
def report_command(scores: tuple[str, ...], output: Path, agg: str, plots: bool, quiet: bool) -> None:
    """Compare scores folders: one table of methods x targets x metrics, as CSV, Markdown and plots."""
    from umxtools.report import make_report, to_rich_table

    report = make_report(list(scores), output, agg=agg, plots=plots)
    if not quiet:
        stderr.print(to_rich_table(report))
    click.echo(str(output))


# --- separate --------------------------------------------------------------------------------


@cli.command("separate")
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--list", "list_file", default=None, metavar="FILE|-", help="Read input paths from FILE, one a line ('-': stdin).")
# -o is checked by the library, whose one-line error names it (Click's file_okay=False prints a 3-line usage error)
@click.option("-o", "--output", "out", default="separated", show_default=True, type=click.Path(path_type=Path),
              help="Writes OUT/<input name>/<target>.wav and separation.json.")
@click.option("--model", default=None,
              help=f"Model folder, or a published open-unmix model: {', '.join(pretrained.PUBLISHED)} "
                   "(downloaded into torch.hub's cache); "
                   f"or a demucs .th file or name ({', '.join(DEMUCS_NAMES)}); "
                   f"or an MSST .ckpt with --model-config [default: {pretrained.DEFAULT}, if its files "
                   "are in torch.hub's cache].")
@click.option("--model-config", type=click.Path(dir_okay=False, path_type=Path), default=None, help="The MSST YAML config of a .ckpt --model.")
@_targets_option("all of the model's")
@click.option("--niter", type=click.IntRange(min=0), default=1, show_default=True, help="Wiener EM iterations (0: none).")
@click.option("--softmask", is_flag=True, help="Start EM from ratio masks instead of magnitudes with the mixture phase.")
@click.option("--residual", is_flag=True,
              help="Also write the mixture minus the targets: 'accompaniment' when the only target is vocals, else 'residual'.")
@click.option("--wiener-win-len", type=click.IntRange(min=0), default=300, show_default=True,
              help="Frames filtered together by the Wiener EM; 0: the whole track (memory grows with it).")
@click.option("--aggregate", multiple=True, metavar="NAME=A+B",
              help="Write the sum of outputs as NAME; with any --aggregate only the aggregates are written "
                   "(e.g. --aggregate vocals=vocals --aggregate accompaniment=drums+bass+other). Repeatable.")
@click.option("--segment", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Run waveform and custom models on segments of this length (not UMX models).")
@click.option("--overlap", type=click.FloatRange(0, 0.5), default=0.25, show_default=True,
              help="Overlap of consecutive segments, as a fraction of a segment, cross-faded linearly (demucs's weights for HTDemucs).")
@click.option("--shifts", type=click.IntRange(min=0), default=0, show_default=True, help="HTDemucs: random time shifts averaged (demucs's shift trick).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --shifts offsets.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Segments run together (HTDemucs, MSST) [default: 1, or the MSST config's].")
@click.option("--num-overlap", type=click.IntRange(min=1), default=None, help="MSST: windows per chunk [default: the config's, else 4].")
@_device_option
@_jobs_option
@click.option("--start", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Start of the excerpt (s).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None, help="Length of the excerpt (s) [default: to the end].")
@click.option("--keep-rate/--no-keep-rate", default=True, show_default=True,
              help="Write at the input's sample rate (resampled back from the model's), else at the model's.")
@click.option("--format", "fmt", type=click.Choice(list(stems.FORMATS)), default="wav", show_default=True)
@click.option("--bits", type=click.Choice(list(stems.BITS)), default=None,
              help="Sample format: 16, 24 or 32f (float) [default: 32f for wav, 24 for flac].")
@click.option("--clip", type=click.Choice(list(stems.CLIP_MODES)), default="clip", show_default=True,
              help="Integer output beyond full scale: clip it (with a warning) or rescale the track's stems by one gain.")
@_shard_option("inputs")
@click.option("--force", is_flag=True,
              help="Redo inputs already separated (replacing only folders holding separation.json); without it a rerun skips "
                   "those made with the same settings.")
# the variable is umxtools.models.loading.TRUST_ENV, written out so that --help does not import torch
@click.option("--trust-code", is_flag=True, envvar="UMXTOOLS_TRUST_CODE",
              help="Run the Python code a model folder's model.json names (its own .py file or a module outside umxtools); "
                   "only for model folders you trust. Env: UMXTOOLS_TRUST_CODE=1.")
@click.option("--ema", is_flag=True, help="A trained model folder's EMA weights (ema.<run>.pth, train --ema) instead of its raw weights.")
@_quiet_option
def separate_command(inputs: tuple[Path, ...], list_file: str | None, out: Path, model: str | None, model_config: Path | None, targets: str | None, niter: int,
                     softmask: bool, residual: bool, wiener_win_len: int, aggregate: tuple[str, ...], segment: float | None,
                     overlap: float, shifts: int, seed: int, batch_size: int | None, num_overlap: int | None, device: str, jobs: int,
                     start: float, duration: float | None, keep_rate: bool, fmt: str,
                     bits: str | None, clip: str, shard: str | None, force: bool, trust_code: bool, ema: bool, quiet: bool) -> None:
    """Separate audio files (or folders of them) into their sources with an Open-Unmix or umxtools model.

    A rerun skips the inputs already separated with the same settings (a requeued Slurm task
    continues); SIGTERM and Ctrl-C stop it cleanly, keeping the finished tracks.
    """
    from umxtools.interrupts import interruptible
    from umxtools.separate_files import Excerpt, collect_inputs, read_list, select_shard, separate_files
    from umxtools.separation import SeparationSettings, parse_aggregate
    from umxtools.stems import OutputOptions

    from umxtools.cache import Shard

    paths = [*inputs, *(read_list(list_file) if list_file else [])]
    items = select_shard(collect_inputs(paths), Shard.parse(shard))
    settings = SeparationSettings(niter=niter, softmask=softmask, residual=residual, wiener_win_len=wiener_win_len or None,
                                  aggregate=parse_aggregate(aggregate), segment=segment, overlap=overlap, device=device,
                                  shifts=shifts, seed=seed, batch_size=batch_size, num_overlap=num_overlap)
    options = OutputOptions(format=fmt, bits=bits, clip=clip, keep_rate=keep_rate, force=force)
    with interruptible(), file_bars([item.path.name for item in items], quiet) as progress:
        results = separate_files(model, items, out, settings, targets=_csv(targets), excerpt=Excerpt(start, duration),
                                 options=options, jobs=jobs, progress=progress, command=["umxtools", *sys.argv[1:]],
                                 trust_code=trust_code, lists=[list_file] if list_file else [], model_config=model_config,
                                 ema=ema)
    failed = 0
    for r in results:
        for w in r.warnings:
            click.echo(f"umxtools: warning: {w}", err=True)
        if r.clipped:
            where = ", ".join(f"{n} ({k})" for n, k in r.clipped.items())
            click.echo(f"umxtools: warning: {r.output}: samples clipped at full scale in {where}; --clip rescale scales instead",
                       err=True)
        if r.error is not None:
            if _State.debug:
                raise r.error
            click.echo(f"umxtools: error: {r.error}", err=True)
            failed += 1
        else:
            click.echo(r.output)
    if failed:
        sys.exit(1)
    if not quiet:
        skipped = sum(r.skipped for r in results)
        click.echo(f"separated {len(results) - skipped}, skipped {skipped} already done", err=True)
