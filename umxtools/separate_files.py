"""Separating many files: inputs, output names, one bad file not stopping the others, processes.

:func:`separate_files` is what ``umxtools separate`` calls. It loads the model once (in each
worker process with ``jobs > 1``), then for every input reads the audio (any rate, mono or
stereo, a ``start``/``duration`` excerpt), resamples it to the model's rate, streams the
separation (:class:`umxtools.separation.Separator`) into a :class:`umxtools.stems.StemWriter`,
and records the settings, the model and the input's identity in ``separation.json`` beside the
stems. A problem with one input (unreadable, too short, an output folder it may not replace)
becomes that input's :class:`FileResult` error; the other inputs are still separated.

Reruns continue (a requeued or preempted Slurm task is the same command run again):

- an input whose output folder is complete (``separation.json`` and every stem it lists) and was
  made with this run's settings (model weights, targets and outputs, Wiener settings, output
  format, excerpt, the input's content; not the device) is skipped; one made with other settings
  is that input's error, naming the folder and ``--force``. ``--force`` redoes every input (it
  still replaces only earlier separations);
- each track is written under an exclusive lock on its output folder (``OUT/.<name>.lock``,
  :func:`umxtools.fileio.exclusive`). Whoever holds it removes the temporary folders of that
  track that a killed writer left (``kill -9``, a node failure): every writer holds the lock, so
  none of them is being written. A second process on the same track meanwhile gets that track's
  "another umxtools process is writing it" error;
- SIGTERM (Slurm's preemption, time limit, requeue, scancel) and SIGINT end the run cleanly: the
  track being written is dropped, in worker processes too, and
  :class:`umxtools.interrupts.Interrupted` propagates; finished tracks stay. Unlike the workers of
  ``eval`` and ``oracle``, separation workers write files, so they catch SIGTERM and SIGINT too.

Inputs (files, folders, list files) and their output names: :mod:`umxtools.separate_inputs`.

Inputs are never outputs: ``OUT`` may not be, contain or lie inside an input file or folder, the
list file or the model folder (``--force`` or not), and ``--force`` replaces only an earlier
separation (a folder holding ``separation.json``, see :mod:`umxtools.stems`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import signal
import threading
import time
import warnings
from collections.abc import Iterable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from umxtools import __version__, audio, fileio, interrupts, workers
from umxtools.errors import AudioError, ModelError, OutputError, UmxError
from umxtools.interrupts import Interrupted
# the inputs and their names live in separate_inputs; re-exported, the names this module always offered
from umxtools.separate_inputs import AUDIO_SUFFIXES, InputItem, collect_inputs, output_name, read_list, select_shard  # noqa: F401
from umxtools.stems import OutputOptions, StemWriter, check_replaceable, is_complete, read_record, remove_stale

if TYPE_CHECKING:
    from umxtools.progress import Progress

RECORD_FORMAT = "umxtools.separation"

# what an interrupted run keeps (the end of its one stderr line)
KEPT = interrupts.TRACKS_KEPT
# seconds a worker process gets to drop its track after SIGTERM before it is killed
WORKER_GRACE = 20.0


@dataclass(frozen=True)
class Excerpt:
    """Which part of every input to separate, in seconds (``duration`` None: to the end)."""

    start: float = 0.0
    duration: float | None = None


@dataclass
class FileResult:
    """What became of one input: its output folder or its error, and what to tell the user;
    ``skipped``: the folder was complete from an earlier run with the same settings."""

    input: str
    output: str | None = None
    error: UmxError | None = None
    skipped: bool = False
    warnings: list[str] = field(default_factory=list)
    clipped: dict[str, int] = field(default_factory=dict)
    audio_seconds: float = 0.0
    seconds: float = 0.0


# --- one file --------------------------------------------------------------------------------------


def separate_file(separator, item: InputItem, out: Path, excerpt: Excerpt, options: OutputOptions, record: dict,
                  progress: Progress | None = None, index: int = 0) -> FileResult:
    """Separate one input into ``out/<name>/``; problems become ``FileResult.error``.

    ``progress(event, info)``: the separator's ``total`` and ``advance``, ``info["file"]`` = ``index``.
    """
    t0 = time.perf_counter()
    result = FileResult(str(item.path))
    tagged = None if progress is None else (lambda event, info: progress(event, {"file": index, **info}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if item.error is not None:
                raise item.error
            final = fileio.safe_child(out, item.name, "output name", item.path)
            with fileio.exclusive(final):  # one writer per track: a requeued task never races its predecessor
                remove_stale(final)  # what killed writers of this track left: nobody else holds the lock
                try:
                    result.output, result.clipped, result.audio_seconds, result.skipped = _separate(
                        separator, item, final, excerpt, options, record, tagged)
                except BaseException:
                    # a signal can land between the partial folder's creation and the code that
                    # guards it (the SIGTERM test of tests/test_separate_requeue.py hit that window once)
                    fileio.remove_leftovers(final, ".partial")
                    raise
        except UmxError as exc:
            result.error = exc
    # a failed input reports its error alone
    result.warnings = [] if result.error else [str(w.message) for w in caught]
    result.seconds = time.perf_counter() - t0
    return result


def _separate(separator, item: InputItem, final: Path, excerpt: Excerpt, options: OutputOptions, record: dict, progress):
    """Separate ``item`` into ``final`` (the caller holds its lock); returns the folder, the
    clipped samples, the seconds of audio and whether an earlier identical separation was kept."""
    path = item.path
    meta = audio.info(path)
    if meta.frames == 0:
        raise AudioError(path, "empty audio file (0 samples)")
    identity = _identity(path)
    record = {**record, "excerpt": {"start_s": excerpt.start, "duration_s": excerpt.duration}}
    replace = False
    if final.exists() or final.is_symlink():
        check_replaceable(final, True)  # a folder separate did not make is never replaced, --force or not
        done = read_record(final)
        if options.force or done is None or not is_complete(final, done):
            replace = True  # --force, or an earlier separation that lost a stem since
        else:
            _check_same_run(final, done, {**record, "input": identity, "output": options.as_dict()})
            return str(final), {}, 0.0, True
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
    record = {**record, "input": {**identity, "sample_rate": rate, "channels": meta.channels, "frames": meta.frames,
                                  "start_s": start / rate, "duration_s": length / rate}}
    t0 = time.perf_counter()
    writer = StemWriter(final, separator.outputs, model_rate, out_rate, out_length, options, replace=replace)
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
    return str(folder), writer.clipped, length / rate, False


def _signature(record: dict) -> dict:
    """What decides the stems of a separation, read from its record (or this run's): the model's
    class, arguments and weights (SHA-256), the outputs, the settings but the device (a requeued
    task may land on another kind of node), the output format, the excerpt, the input's content."""
    model = record.get("model") if isinstance(record.get("model"), dict) else {}
    files = model.get("files") if isinstance(model.get("files"), dict) else {}
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    output = record.get("output") if isinstance(record.get("output"), dict) else {}
    given = record.get("input") if isinstance(record.get("input"), dict) else {}
    signature = {  # in the order a difference is reported: the most telling first
        "outputs": record.get("outputs_order"),
        "settings": {k: v for k, v in settings.items() if k != "device"},
        "output": {k: output.get(k) for k in ("format", "bits", "clip", "keep_rate")},
        "excerpt": record.get("excerpt"),
        "model": {"class": model.get("class"), "args": model.get("args"), "urls": model.get("urls"),
                  "weights": {name: f.get("sha256") if isinstance(f, dict) else None for name, f in files.items()}},
        "input": {k: given.get(k) for k in ("sha256", "size_bytes")},
    }
    return json.loads(json.dumps(signature))  # as read back from JSON: tuples are lists


def _difference(old, new, key: str = "") -> tuple[str, object, object] | None:
    """The first dotted key whose value differs between two signatures, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*new, *(k for k in old if k not in new)]:
            found = _difference(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
            if found is not None:
                return found
        return None
    return None if old == new else (key, old, new)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_same_run(final: Path, done: dict, now: dict) -> None:
    """Refuse to keep a complete separation that this run would not have written as it is."""
    found = _difference(_signature(done), _signature(now))
    if found is None:
        return
    key, old, new = found
    if key.startswith("input."):
        raise OutputError(final, f"holds the separation of another content of {now['input'].get('path')} (the input changed "
                                 "since); pass --force to replace it")
    raise OutputError(final, f"holds a separation made with other settings ({key} {_short(old)} there, {_short(new)} now); "
                             "pass --force to replace it, or choose another -o")


def _identity(path: Path) -> dict:
    from umxtools.models.loading import file_identity

    return file_identity(path)


# --- many files ------------------------------------------------------------------------------------


def separate_files(
    model_source: str | None,
    items: list[InputItem],
    out: str | Path,
    settings=None,
    targets: list[str] | None = None,
    excerpt: Excerpt = Excerpt(),
    options: OutputOptions = OutputOptions(),
    jobs: int = 1,
    progress: Progress | None = None,
    command: list[str] | None = None,
    trust_code: bool = False,
    lists: Iterable[str | Path] = (),
    model_config: str | Path | None = None,
    ema: bool = False,
) -> list[FileResult]:
    """Separate every input with one model; results in input order.

    ``model_source`` None: the published default (:func:`umxtools.pretrained.default_model`),
    only if its weights are in torch.hub's cache. Errors that concern every input (an unknown
    or absent model, bad settings, an unwritable ``out``, an ``out`` that is or holds an input,
    the list files ``lists`` or the model folder, a model folder that would run code without
    ``trust_code``) are raised before any work; an input's own problem is its
    :class:`FileResult`'s ``error``. ``progress(event, info)`` (:mod:`umxtools.progress`) gets
    ``start``, ``total``, ``advance`` and ``done`` per input, ``info["file"]`` its index. A SIGTERM or SIGINT (in the main thread) raises
    :class:`~umxtools.interrupts.Interrupted` once the track being written is dropped
    (:func:`umxtools.interrupts.interruptible`). ``ema``: a trained folder's EMA weights
    (``--ema`` of train) instead of its raw weights.
    """
    from umxtools.models.loading import load_model
    from umxtools.pretrained import default_model
    from umxtools.separation import SeparationSettings, Separator

    settings = settings or SeparationSettings()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(out, "is a file; -o names the folder that receives one <input name>/ folder per input")
    fileio.check_disjoint(out, [p for it in items for p in (it.given, it.path)], "input")
    fileio.check_disjoint(out, [p for p in lists if str(p) != "-"], "input list")
    if items and all(it.error is not None for it in items):  # nothing to separate: say so before finding a model
        return [FileResult(str(it.path), error=it.error) for it in items]
    if model_source is None:
        model_source = default_model(targets)
    if Path(model_source).expanduser().exists():
        fileio.check_disjoint(out, [Path(model_source).expanduser()], "model folder")
    model = load_model(model_source, targets, trust_code=trust_code, config=model_config, ema=ema)
    separator = Separator(model, settings)  # checks the settings against the model
    fileio.check_writable(out)
    record = {"format": RECORD_FORMAT, "format_version": 1, "model": model.identity,
              "model_sample_rate": model.sample_rate, "outputs_order": separator.outputs, "residual_output": separator.residual,
              "settings": {**settings.as_dict(), "device": str(separator.device)},
              "umxtools_version": __version__, "command": command, "created": datetime.now(timezone.utc).isoformat()}
    progress = progress or (lambda event, info: None)
    with interrupts.interruptible(KEPT):
        if jobs <= 1 or len(items) == 1:
            results = []
            for i, item in enumerate(items):
                progress("start", {"file": i})
                results.append(separate_file(separator, item, out, excerpt, options, record, progress, i))
                progress("done", {"file": i})
            return results
        del separator, model  # each worker loads its own
        jobs = min(jobs, len(items))
        return _in_processes(model_source, targets, settings, record, items, out, excerpt, options, jobs, progress, trust_code,
                             model_config, ema)


_STOP_SIGNALS = interrupts.SIGNALS


# --- worker processes ------------------------------------------------------------------------------

_WORKER: dict = {}


def _worker_signal(signum, frame) -> None:
    """In a worker: drop the track being written (the exception unwinds its writer and lock),
    or, between tracks, end at once (there is nothing to drop). Later signals (the parent's
    SIGTERM after Slurm's) are ignored: they would cut the unwinding short."""
    if _WORKER.get("busy"):
        for s in _STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum, KEPT)
    os._exit(128 + signum)


def _worker_init(model_source, targets, settings, record, threads, events, trust_code, model_config=None, ema=False) -> None:
    import torch

    from umxtools.models.loading import load_model
    from umxtools.separation import Separator

    for s in _STOP_SIGNALS:
        signal.signal(s, _worker_signal)
    torch.set_num_threads(threads)
    model = load_model(model_source, targets, identity=False, trust_code=trust_code, config=model_config, ema=ema)
    _WORKER.update(separator=Separator(model, settings), record=record, events=events)


def _worker_run(index: int, item: InputItem, out: Path, excerpt: Excerpt, options: OutputOptions) -> FileResult:
    events = _WORKER["events"]
    events.put(("start", {"file": index}))
    _WORKER["busy"] = True
    try:
        return separate_file(_WORKER["separator"], item, out, excerpt, options, _WORKER["record"],
                             lambda e, info: events.put((e, info)), index)
    except Interrupted as exc:
        # the track is dropped and its lock released: this worker ends, the parent stops the rest
        os._exit(128 + exc.signum)
    finally:
        _WORKER["busy"] = False
        events.put(("done", {"file": index}))


def _stop_workers(workers: list) -> None:
    """SIGTERM to each worker (each drops its track, :func:`_worker_signal`), then wait; a worker
    still running after :data:`WORKER_GRACE` s (deep in one long torch call) is killed, and its
    temporary folder is the next run's to remove."""
    for w in workers:
        w.terminate()
    deadline = time.monotonic() + WORKER_GRACE
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
        if w.is_alive():
            w.kill()
            w.join()


def _in_processes(model_source, targets, settings, record, items, out, excerpt, options, jobs, progress, trust_code,
                  model_config=None, ema=False) -> list[FileResult]:
    events = multiprocessing.get_context("spawn").Queue()  # the context of workers.pool's processes
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
    others = set(multiprocessing.active_children())
    # workers.pool: spawned; _worker_init then replaces the SIGINT it ignores with _worker_signal
    pool = workers.pool(jobs, _worker_init, (str(model_source), targets, settings, record, threads, events, trust_code, model_config,
                                                   ema))
    try:
        futures = [pool.submit(_worker_run, i, item, out, excerpt, options) for i, item in enumerate(items)]
        results = [f.result() for f in futures]
    except BaseException as exc:
        # a signal here, or a worker that died: no new track starts, and every worker drops its own.
        # A signal meanwhile is noted, not raised: it must not cut this cleanup short
        caught: list[int] = []
        main = threading.current_thread() is threading.main_thread()
        before = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in _STOP_SIGNALS} if main else {}
        try:
            pool.shutdown(wait=False, cancel_futures=True)
            _stop_workers([w for w in multiprocessing.active_children() if w not in others])
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)
        if caught and not isinstance(exc, Interrupted):
            raise Interrupted(caught[0], KEPT) from exc
        if isinstance(exc, BrokenProcessPool):
            raise OutputError(out, f"a worker process ended before its track was written (killed, or out of memory); {KEPT}") from exc
        raise
    finally:
        stop.set()
        relay_thread.join()
    pool.shutdown(wait=True)
    return results
