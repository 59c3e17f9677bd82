"""Separating many files: inputs, output names, one bad file not stopping the others, processes.

:func:`separate_files` is what ``umxtools separate`` calls. It loads the model once (in each
worker process with ``jobs > 1``), then for every input reads the audio (any rate, mono or
stereo, a ``start``/``duration`` excerpt), resamples it to the model's rate, streams the
separation (:class:`umxtools.separation.Separator`) into a :class:`umxtools.stems.StemWriter`,
and records the settings, the model and the input's identity in ``separation.json`` beside the
stems. A problem with one input (unreadable, too short, an existing output folder) becomes that
input's :class:`FileResult` error; the other inputs are still separated.

Output names: ``OUT/<input stem>/``; a file called ``mixture.*`` (MUSDB18-HQ's layout) is named
after its folder and a ``.stem.mp4`` after its name without ``.stem``, so separating a MUSDB18
split gives ``OUT/<track>/<target>.wav``, the layout ``umxtools eval`` reads. A name that is not a
plain file name (``..wav`` gives ``.``) is that input's error.

Inputs are never outputs: ``OUT`` may not be, contain or lie inside an input file or folder, the
list file or the model folder (``--force`` or not), and ``--force`` replaces only an earlier
separation (a folder holding ``separation.json``, see :mod:`umxtools.stems`).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from umxtools import __version__, audio, fileio
from umxtools.errors import AudioError, ModelError, UmxError, UsageError
from umxtools.stems import OutputOptions, StemWriter, check_replaceable

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3", ".mp4", ".m4a", ".aac")
RECORD_FORMAT = "umxtools.separation"

FilesProgress = Callable[[int, str, int], None]


@dataclass(frozen=True)
class InputItem:
    """One input: the file, its output folder name, or why it cannot be separated; ``given``:
    the argument it was found through (the file itself, or a folder holding it)."""

    path: Path
    name: str
    error: UmxError | None = None
    given: Path | None = None


@dataclass(frozen=True)
class Excerpt:
    """Which part of every input to separate, in seconds (``duration`` None: to the end)."""

    start: float = 0.0
    duration: float | None = None


@dataclass
class FileResult:
    """What became of one input: its output folder or its error, and what to tell the user."""

    input: str
    output: str | None = None
    error: UmxError | None = None
    warnings: list[str] = field(default_factory=list)
    clipped: dict[str, int] = field(default_factory=dict)
    audio_seconds: float = 0.0
    seconds: float = 0.0


# --- inputs ----------------------------------------------------------------------------------------


def read_list(source: str | Path, stdin: Iterable[str] | None = None) -> list[str]:
    """Paths from a list file (``-``: ``stdin``), one a line; blank lines and ``#`` comments skipped."""
    if str(source) == "-":
        lines = list(stdin if stdin is not None else sys.stdin)
    else:
        try:
            lines = Path(source).read_text().splitlines()
        except OSError as exc:
            raise UsageError(source, f"cannot read the input list ({exc.strerror or exc})") from exc
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def collect_inputs(items: Iterable[str | Path]) -> list[InputItem]:
    """Files as given; a folder holding ``mixture.*`` is that track; any other folder gives its
    audio files and its track subfolders (sorted). A later input whose output name repeats an
    earlier one is an error (its stems would overwrite the other's)."""
    found: list[InputItem] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files = _folder_inputs(path)
            if not files:
                found.append(InputItem(path, path.name, AudioError(path, "folder holds no audio files"), path))
            found += [_item(f, path) for f in files]
        else:
            found.append(_item(path, path))
    if not found:
        raise UsageError(None, "no inputs: give audio files, folders or a list of paths")
    seen: dict[str, Path] = {}
    out = []
    for it in found:
        if it.error is None and it.name in seen:
            it = InputItem(it.path, it.name, UsageError(it.path, f"has the same output name {it.name!r} as {seen[it.name]}"), it.given)
        elif it.error is None:
            seen[it.name] = it.path
        out.append(it)
    return out


def _item(path: Path, given: Path) -> InputItem:
    name = output_name(path)
    try:
        fileio.check_name(name, "output name", path)
    except UmxError as exc:
        return InputItem(path, name, exc, given)
    return InputItem(path, name, None, given)


def _mixture(folder: Path) -> Path | None:
    for suffix in AUDIO_SUFFIXES:
        if (folder / f"mixture{suffix}").is_file():
            return folder / f"mixture{suffix}"
    return None


def _folder_inputs(folder: Path) -> list[Path]:
    own = _mixture(folder)
    if own is not None:
        return [own]
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES]
    tracks = [m for p in entries if p.is_dir() and (m := _mixture(p)) is not None]
    return files + tracks


def output_name(path: Path) -> str:
    """The output folder name of an input file (see the module docstring)."""
    stem = path.stem
    if path.name.lower().endswith(".stem.mp4"):
        stem = path.name[: -len(".stem.mp4")]
    if stem == "mixture" and path.parent.name:
        return path.parent.resolve().name
    return stem


# --- one file --------------------------------------------------------------------------------------


def separate_file(separator, item: InputItem, out: Path, excerpt: Excerpt, options: OutputOptions, record: dict,
                  progress: Callable[[str, int], None] | None = None) -> FileResult:
    """Separate one input into ``out/<name>/``; problems become ``FileResult.error``."""
    t0 = time.perf_counter()
    result = FileResult(str(item.path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if item.error is not None:
                raise item.error
            result.output, result.clipped, result.audio_seconds = _separate(separator, item, out, excerpt, options, record, progress)
        except UmxError as exc:
            result.error = exc
    # a failed input reports its error alone
    result.warnings = [] if result.error else [str(w.message) for w in caught]
    result.seconds = time.perf_counter() - t0
    return result


def _separate(separator, item: InputItem, out: Path, excerpt: Excerpt, options: OutputOptions, record: dict, progress):
    path, final = item.path, fileio.safe_child(out, item.name, "output name", item.path)
    check_replaceable(final, options.force)  # again when the stems are complete
    meta = audio.info(path)
    start = round(excerpt.start * meta.sample_rate)
    if start >= meta.frames:
        raise AudioError(path, f"starts at {excerpt.start:g} s, after its end ({meta.duration:.2f} s)")
    frames = None if excerpt.duration is None else max(1, round(excerpt.duration * meta.sample_rate))
    mix, rate = audio.read(path, start, frames, stereo=True)  # (2, samples) at the file's rate
    length = mix.shape[1]
    model_rate = separator.sample_rate
    if rate != model_rate:
        warnings.warn(f"{path}: resampling from {rate} Hz to the model's {model_rate} Hz"
                      + (" and back" if options.keep_rate else ""), stacklevel=2)
        mix = audio.resample(mix, rate, model_rate)
    if mix.shape[1] < separator.min_samples:
        raise AudioError(path, f"is shorter than one STFT frame ({mix.shape[1]} samples at {model_rate} Hz; "
                               f"the model needs {separator.min_samples})")
    out_rate = rate if options.keep_rate else model_rate
    out_length = length if out_rate == rate else mix.shape[1]
    record = {**record, "input": {**_identity(path), "sample_rate": rate, "channels": meta.channels, "frames": meta.frames,
                                  "start_s": start / rate, "duration_s": length / rate}}
    t0 = time.perf_counter()
    writer = StemWriter(final, separator.outputs, model_rate, out_rate, out_length, options)
    try:
        try:
            for block in separator.stream(mix, progress):
                writer.write(block)
        except (RuntimeError, ValueError) as exc:  # the model's own failure (out of memory, a user model's bug)
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ModelError(path, f"the model failed on this input ({type(exc).__name__}: {first}); --debug shows the traceback") from exc
        record["seconds"] = round(time.perf_counter() - t0, 3)
        folder = writer.close(record)
    except BaseException:
        writer.abort()
        raise
    return str(folder), writer.clipped, length / rate


def _identity(path: Path) -> dict:
    from umxtools.models.loading import file_identity  # noqa: PLC0415

    return file_identity(path)


# --- many files ------------------------------------------------------------------------------------


def separate_files(
    model_source: str,
    items: list[InputItem],
    out: str | Path,
    settings=None,
    targets: list[str] | None = None,
    excerpt: Excerpt = Excerpt(),
    options: OutputOptions = OutputOptions(),
    jobs: int = 1,
    progress: FilesProgress | None = None,
    command: list[str] | None = None,
    trust_code: bool = False,
    lists: Iterable[str | Path] = (),
    model_config: str | Path | None = None,
) -> list[FileResult]:
    """Separate every input with one model; results in input order.

    Errors that concern every input (an unknown model, bad settings, an unwritable ``out``, an
    ``out`` that is or holds an input, the list files ``lists`` or the model folder, a model
    folder that would run code without ``trust_code``) are raised before any work; an input's own
    problem is its :class:`FileResult`'s ``error``. ``progress(index, event, n)`` gets ``start``,
    ``total``, ``advance`` and ``done`` per input.
    """
    from umxtools.models.loading import load_model  # noqa: PLC0415
    from umxtools.separation import SeparationSettings, Separator  # noqa: PLC0415

    settings = settings or SeparationSettings()
    out = Path(out)
    fileio.check_disjoint(out, [p for it in items for p in (it.given, it.path)], "input")
    fileio.check_disjoint(out, [p for p in lists if str(p) != "-"], "input list")
    if Path(model_source).expanduser().exists():
        fileio.check_disjoint(out, [Path(model_source).expanduser()], "model folder")
    model = load_model(model_source, targets, trust_code=trust_code, config=model_config)
    separator = Separator(model, settings)  # checks the settings against the model
    fileio.check_writable(out)
    record = {"format": RECORD_FORMAT, "format_version": 1, "model": model.identity,
              "model_sample_rate": model.sample_rate, "outputs_order": separator.outputs,
              "settings": {**settings.as_dict(), "device": str(separator.device)},
              "umxtools_version": __version__, "command": command, "created": datetime.now(timezone.utc).isoformat()}
    progress = progress or (lambda index, event, n: None)
    if jobs <= 1 or len(items) == 1:
        results = []
        for i, item in enumerate(items):
            progress(i, "start", 0)
            results.append(separate_file(separator, item, out, excerpt, options, record, lambda e, n, i=i: progress(i, e, n)))
            progress(i, "done", 0)
        return results
    del separator, model  # each worker loads its own
    jobs = min(jobs, len(items))
    return _in_processes(model_source, targets, settings, record, items, out, excerpt, options, jobs, progress, trust_code,
                         model_config)


_WORKER: dict = {}


def _worker_init(model_source, targets, settings, record, threads, events, trust_code, model_config=None) -> None:
    import torch  # noqa: PLC0415

    from umxtools.models.loading import load_model  # noqa: PLC0415
    from umxtools.separation import Separator  # noqa: PLC0415

    torch.set_num_threads(threads)
    model = load_model(model_source, targets, identity=False, trust_code=trust_code, config=model_config)
    _WORKER.update(separator=Separator(model, settings), record=record, events=events)


def _worker_run(index: int, item: InputItem, out: Path, excerpt: Excerpt, options: OutputOptions) -> FileResult:
    events = _WORKER["events"]
    events.put((index, "start", 0))
    try:
        return separate_file(_WORKER["separator"], item, out, excerpt, options, _WORKER["record"],
                             lambda e, n: events.put((index, e, n)))
    finally:
        events.put((index, "done", 0))


def _in_processes(model_source, targets, settings, record, items, out, excerpt, options, jobs, progress, trust_code,
                  model_config=None) -> list[FileResult]:
    # spawn, not fork: a forked child of a process that already ran torch's OpenMP pool can hang
    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    stop = threading.Event()

    def relay() -> None:  # worker progress events -> the caller's callback, in this process
        while not stop.is_set() or not events.empty():
            try:
                progress(*events.get(timeout=0.1))
            except queue.Empty:
                continue

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    try:
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                 initargs=(str(model_source), targets, settings, record, threads, events, trust_code, model_config)) as pool:
            futures = [pool.submit(_worker_run, i, item, out, excerpt, options) for i, item in enumerate(items)]
            return [f.result() for f in futures]
    finally:
        stop.set()
        relay_thread.join()
