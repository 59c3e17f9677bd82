"""The ``umxtools`` command line: thin Click commands over the library.

Each command parses flags, calls one library function and prints the path of the artifact it made
on stdout (so ``$(umxtools cache ...)`` works); progress and messages go to stderr. Library errors
become one line, ``umxtools: error: PATH: problem``, and exit code 1 (``--debug`` shows the
traceback); usage errors exit with 2 as Click's do.
"""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from umxtools import __version__
from umxtools.errors import UmxError

stderr = Console(stderr=True)


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


@contextmanager
def _progress(description: str, quiet: bool):
    """A rich progress bar on stderr driven by the library's ``progress(event, n)`` callback."""
    if quiet:
        yield None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    # transient: the bar leaves no line behind, so an error stays the only line on stderr
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(event: str, n: int) -> None:
            if event == "total":
                bar.update(task, total=n)
            else:
                bar.advance(task, n)

        yield update


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


# --- toy -------------------------------------------------------------------------------------


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tracks", default=8, show_default=True, type=click.IntRange(min=1), help="Train tracks.")
@click.option("--test-tracks", default=None, type=click.IntRange(min=1), help="Test tracks [default: max(2, tracks // 4)].")
@click.option("--seconds", default=8.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Length of each track.")
@click.option("--seed", default=0, show_default=True, type=int)
def toy(out: Path, tracks: int, test_tracks: int | None, seconds: float, seed: int) -> None:
    """Write a synthetic MUSDB18-HQ-layout dataset (vocals, drums, bass, other, mixture)."""
    from umxtools.toy import make_toy_dataset  # noqa: PLC0415

    make_toy_dataset(out, tracks=tracks, seconds=seconds, seed=seed, test_tracks=test_tracks)
    click.echo(str(out))


# --- cache -----------------------------------------------------------------------------------


@cli.group()
def cache() -> None:
    """Build, inspect, check and merge HDF5 spectrogram caches."""


def _cache_build_options(f):
    """Flags every cache-building command shares (storage, STFT, sharding, parallelism)."""
    from umxtools.cache import CHUNK_FRAMES, COMPRESSIONS, DTYPES  # noqa: PLC0415

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
        click.option("--shard", default=None, metavar="K/N", help="Build only tracks i with i % N == K (merge with 'cache merge')."),
        click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Decode processes."),
        click.option("--force", is_flag=True, help="Replace an existing output file."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _build(refs, sources, meta, out, dtype, compression, chunk_frames, waveforms, sample_rate, nfft, nhop, resample, shard, jobs, force, quiet):
    from umxtools.cache import CacheOptions, Shard, build_cache  # noqa: PLC0415
    from umxtools.transforms import STFTSettings  # noqa: PLC0415

    options = CacheOptions(settings=STFTSettings(sample_rate=sample_rate, n_fft=nfft, n_hop=nhop), dtype=dtype,
                           compression=compression, chunk_frames=chunk_frames, waveforms=waveforms, resample=resample)
    with _progress(f"caching {out.name}", quiet) as progress:
        path = build_cache(refs, out, sources, options, meta=meta, shard=Shard.parse(shard), jobs=jobs, force=force,
                           command=["umxtools", *sys.argv[1:]], progress=progress)
    click.echo(str(path))


@cache.command("musdb")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--is-wav", is_flag=True, help="MUSDB18-HQ layout (track folders of wavs) instead of .stem.mp4.")
@click.option("--subsets", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--split", type=click.Choice(["train", "valid", "all"]), default="train", show_default=True,
              help="musdb's train/valid split of the train subset ('all': no split).")
@click.option("--valid-tracks", default=None, help="Comma-separated track names forming the valid split (default: musdb's list).")
@_cache_build_options
def cache_musdb(root: Path, is_wav: bool, subsets: str, split: str, valid_tracks: str | None, **kw) -> None:
    """Cache MUSDB18 (.stem.mp4) or MUSDB18-HQ (--is-wav) through musdb's DB."""
    from umxtools.datasets import MUSDB_SOURCES, musdb_tracks  # noqa: PLC0415

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
    from umxtools.datasets import folder_tracks  # noqa: PLC0415

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
    from umxtools.datasets import module_tracks  # noqa: PLC0415

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
    from umxtools.cache import cache_summary  # noqa: PLC0415

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
    """Verify stored checksums and that the input files did not change since the build."""
    from umxtools.cache import check_cache  # noqa: PLC0415
    from umxtools.errors import CacheError  # noqa: PLC0415

    problems = check_cache(file)
    for p in problems:  # the report itself, on stdout; the verdict is the error line
        click.echo(f"{file}: {p}")
    if problems:
        raise CacheError(file, f"{len(problems)} problem(s) found")
    click.echo(str(file))


@cache.command("merge")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def cache_merge(out: Path, shards: tuple[Path, ...], force: bool) -> None:
    """Join shard caches (built with --shard K/N) and recompute the statistics."""
    from umxtools.cache import merge_caches  # noqa: PLC0415

    click.echo(str(merge_caches(out, list(shards), force=force, command=["umxtools", *sys.argv[1:]])))
