"""Scoring estimates: museval's BSSEval v4 per track, resumable and parallel, plus the MDX SDR.

Layout, museval's own (``museval.eval_mus_dir``):

- estimates: ``ESTIMATES/<subset>/<track>/<target>.wav`` for MUSDB18 references,
  ``ESTIMATES/<track>/<target>.wav`` for a folder of references;
- scores: one JSON per track at ``SCORES/<subset>/<track>.json`` (or ``SCORES/<track>.json``), in
  the format ``museval.TrackStore`` writes (BSSEval v4 frame scores, 1 s windows and hops, values
  quantised to 1e-5, infinities stored as NaN), so museval's ``EvalStore``/``MethodStore`` read
  them too. A ``umxtools`` block beside museval's keys records the settings, the estimate files
  (size and mtime, for resume) and the MDX whole-track SDR (``uSDR``) per target.

One track is scored by :func:`umxtools.track_scoring.score_track` (museval's groups, the backends,
the uSDR); this module runs it over a folder.

A track is the unit of work and of resume: its JSON is written atomically when it is scored, a
run skips tracks whose JSON exists, fits the run's settings and whose estimate files did not
change; ``jobs`` scores tracks in worker processes; ``shard`` takes every N-th track, so cluster
array jobs can share one scores folder (a shard with no track is an error). Temporary score files
of killed runs are removed under the track's lock; inside :func:`umxtools.interrupts.interruptible`
a SIGTERM or SIGINT stops the workers at once and leaves only finished score files. In an
estimates folder ``oracle`` made, a track it has not finished (no record, or missing while the
references have it) is that track's error (:func:`umxtools.oracle.track_problem`).

The scores folder is never one of the inputs (the estimates, the references), and is a folder
``eval`` made itself (:func:`umxtools.fileio.claim_folder`) or a new or empty one. There is no
folder-wide lock: shards of one array write into one folder at the same time, by design. Two
runs that overlap on a track are kept apart per track instead: the score file is written under
its own lock (:func:`umxtools.fileio.exclusive`), and a file another run wrote since this run
looked at it is overwritten only when it was scored with this run's settings.
"""

from __future__ import annotations

import concurrent.futures as cf
import warnings
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from umxtools import fileio, interrupts, oracle, scores, workers
from umxtools.errors import DatasetError, LockedError, ScoreError, UmxError, UsageError, check_choice
from umxtools.references import VOCALS, References
# the score-file format lives in umxtools.scores; these names stay importable from here
from umxtools.scores import SCORE_FORMAT, SCORE_FORMAT_VERSION, read_scores, score_path, to_json  # noqa: F401  (re-exported)
# one track's scoring lives in umxtools.track_scoring; these names stay importable from here (and
# score_track is looked up here, so that tests can wrap it)
from umxtools.track_scoring import (  # noqa: F401  (re-exported)
    BACKENDS,
    DEFAULT_BACKEND,
    ESTIMATE_SUFFIX,
    HOP,
    METRICS,
    MODE,
    USDR,
    USDR_DEFINITION,
    USDR_DELTA,
    WIN,
    Backend,
    _run_settings,
    _single_target_problem,
    bsseval_groups,
    canonical_order,
    fit_length,
    score_track,
    whole_track_sdr,
)

if TYPE_CHECKING:
    from umxtools.cache import Shard
    from umxtools.progress import Progress

# --- a folder of estimates -----------------------------------------------------------------------


@dataclass
class EvalSummary:
    """What :func:`evaluate_estimates` did."""

    output: Path
    targets: list[str]
    scored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already scored, estimates unchanged
    failed: list[UmxError] = field(default_factory=list)
    seconds_scored: float = 0.0  # audio duration of the tracks scored in this run
    references_without_estimates: int = 0


@dataclass(frozen=True)
class _Job:
    references: References
    track: str
    estimate_dir: str
    targets: tuple[str, ...]
    backend: str


def _score_job(job: _Job) -> tuple[str, str | UmxError, float, list[str]]:
    """Worker entry point: the JSON text or the error (returned, not raised: the run goes on), and
    the warnings (returned too: the parent shows them, whatever process scored the track)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            doc = score_track(job.references, job.track, job.estimate_dir, list(job.targets), job.backend)
        except UmxError as exc:
            return job.track, exc, 0.0, [str(w.message) for w in caught]
    return job.track, to_json(doc), doc["umxtools"]["duration_s"], [str(w.message) for w in caught]


def estimate_tracks(estimates: str | Path, references: References) -> tuple[Path, list[str]]:
    """The folder of per-track estimate folders and the track names in it, sorted."""
    base = Path(estimates) / references.prefix
    if not base.is_dir():
        layout = f"<subset>/<track>/<target>{ESTIMATE_SUFFIX}" if str(references.prefix) != "." else f"<track>/<target>{ESTIMATE_SUFFIX}"
        hint = "; made by: umxtools separate INPUT -o ESTIMATES/<subset> or umxtools oracle"
        if Path(estimates).is_dir() and any((Path(estimates) / n).is_dir() for n in references.track_names()):
            hint = f"; the tracks are directly in {estimates}: move them into {base}"
        raise DatasetError(base, f"no such estimates folder (expected ESTIMATES/{layout}, museval's layout){hint}")
    try:
        names = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise DatasetError(base, f"cannot list the estimates folder ({fileio.os_problem(exc)})") from exc
    if not names:
        raise DatasetError(base, "no track folders of estimates")
    return base, names


def discover_targets(base: Path, tracks: list[str], references: References) -> list[str]:
    """Every target some track has an estimate for (``<target>.wav``), in canonical order."""
    known = references.known_targets()
    found = set()
    for name in tracks:
        found |= {p.stem for p in (base / name).glob(f"*{ESTIMATE_SUFFIX}") if not p.name.startswith(".")}
    found &= set(known)  # other files (a separation's residual.wav, a mixture.wav) are not scored
    if not found:
        raise DatasetError(base, f"no estimates named after a target ({', '.join(f'{t}{ESTIMATE_SUFFIX}' for t in known)})")
    return canonical_order(found)


def _resume_state(path: Path, settings: dict, estimate_dir: Path, targets: list[str]) -> str:
    """``"todo"``, ``"done"`` or ``"stale"`` (estimates changed); ScoreError if settings differ.

    A corrupt file is rescored with a warning: it holds nothing worth keeping, and the run can go on.
    """
    if not path.exists():
        return "todo"
    try:
        doc = read_scores(path)
    except ScoreError as exc:
        warnings.warn(f"{exc}; scoring the track again", stacklevel=3)
        return "todo"
    problem = scores.settings_problem(doc, settings)
    if problem:
        raise ScoreError(path, f"{problem}: score into another folder or pass --force to rescore")
    estimates = doc["umxtools"].get("estimates")
    # a malformed record reads as changed estimates: the track is scored again
    recorded = {e.get("target"): (e.get("size"), e.get("mtime_ns"))
                for e in (estimates if isinstance(estimates, list) else []) if isinstance(e, dict)}
    for target in targets:
        try:
            st = (estimate_dir / f"{target}{ESTIMATE_SUFFIX}").stat()
        except OSError:
            return "stale"  # the estimate is gone: scoring again reports it
        if recorded.get(target) != (st.st_size, st.st_mtime_ns):
            return "stale"
    return "done"


def evaluate_estimates(
    estimates: str | Path,
    references: References,
    output: str | Path,
    targets: list[str] | None = None,
    backend: str = DEFAULT_BACKEND,
    jobs: int = 1,
    shard: Shard | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> EvalSummary:
    """Score every track folder of ``estimates`` into ``output`` (see the module docstring).

    Args:
        estimates: the estimates root (``<subset>/<track>/<target>.wav`` or ``<track>/<target>.wav``).
        references: the true sources.
        output: the scores root; one JSON per track, written as each track finishes.
        targets: the targets to score; default every target some track has an estimate for.
        backend: a key of :data:`BACKENDS`.
        jobs: worker processes (1: score in this process).
        shard: score only tracks ``i`` with ``i % N == K`` (sorted by name).
        force: rescore tracks that already have a score file.
        progress: ``progress("total", {"n": n})`` once, then ``progress("advance", {"n": 1})`` per
            track (:mod:`umxtools.progress`).

    Returns:
        An :class:`EvalSummary`. Per-track problems (a missing or unreadable estimate, another
        sample rate, NaN, a silent source, a track the references lack, a track name that is no
        plain file name, a score file another run is writing or wrote with other settings
        meanwhile) are collected in ``failed`` while the other tracks are scored; problems with
        the whole run (no estimates, unreadable references, a single target, score files made
        with other settings, an output that is an input or not eval's, a full disk) raise.
    """
    from umxtools.cache import Shard  # h5py: not needed by the scoring workers

    check_choice(backend, BACKENDS, "backend")
    for name in targets or ():
        fileio.check_name(name, "target")
    shard = shard or Shard()
    output = Path(output)
    fileio.check_disjoint(output, [estimates], "estimates folder")
    fileio.check_disjoint(output, [references.root], "references")
    base, tracks = estimate_tracks(estimates, references)
    reference_names = set(references.track_names())
    if targets:
        known = references.known_targets()
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise UsageError(None, f"unknown target(s) {', '.join(unknown)}; the references have {', '.join(known)}")
        targets = canonical_order(targets)
    else:
        targets = discover_targets(base, tracks, references)
    if not bsseval_groups(targets):
        problem = _single_target_problem(targets)
        if targets == [VOCALS] and any((base / name / f"residual{ESTIMATE_SUFFIX}").exists() for name in tracks):
            # separate --residual of a vocals-only model: what is not vocals is the accompaniment
            problem += ("; residual.wav is not a target: separate such a model again with --residual, which names it "
                        "accompaniment.wav, or rename residual.wav to accompaniment.wav")
        raise UsageError(None, problem)
    settings = _run_settings(backend, targets)
    # a folder oracle made holds every track of its references once its run is complete: the
    # tracks it lacks, and its tracks without their record, are a stopped oracle run's
    oracle_folder = fileio.made_by(estimates) == "oracle"
    if oracle_folder and oracle.made_for(estimates, references):
        tracks = sorted(set(tracks) | reference_names)
    selected = [name for i, name in enumerate(tracks) if shard.selects(i)]
    if not selected:
        raise UsageError(None, f"shard {shard} selects none of the {len(tracks)} tracks of {base}; use at most {len(tracks)} shards")
    # before any track is scored: the folder is eval's (or new) and can be written
    fileio.claim_folder(output, "eval")
    fileio.check_writable(output / references.prefix)

    summary = EvalSummary(output=output, targets=targets)
    summary.references_without_estimates = len(reference_names - set(tracks))
    todo: list[_Job] = []
    seen: dict[str, tuple | None] = {}  # the score file each track had when this run looked
    for name in selected:
        estimate_dir = base / name
        try:
            fileio.check_name(name, "track", base)
        except UsageError as exc:
            summary.failed.append(exc)
            continue
        path = score_path(output, references, name)
        if name not in reference_names:
            summary.failed.append(DatasetError(estimate_dir, f"no track {name!r} in the references ({_describe(references)})"))
            continue
        if oracle_folder:
            problem = oracle.track_problem(estimate_dir, None, None, targets)
            if problem:
                summary.failed.append(DatasetError(estimate_dir, f"{problem}; finish the folder first: run the umxtools "
                                                   f"oracle command that writes {estimates} again (it redoes incomplete tracks)"))
                continue
        scores.remove_leftovers_of(path)
        seen[name] = scores.file_state(path)
        state = "todo" if force else _resume_state(path, settings, estimate_dir, targets)
        if state == "done":
            summary.skipped.append(name)
        else:
            todo.append(_Job(references, name, str(estimate_dir), tuple(targets), backend))

    if progress:
        progress("total", {"n": len(todo)})
    # closed here, not when the traceback is freed: an interrupted run stops its workers at once
    with closing(_run_jobs(todo, jobs)) as results:
        for track, result, seconds, notes in results:
            for note in notes:
                warnings.warn(note, stacklevel=2)
            if isinstance(result, UmxError):
                summary.failed.append(result)
            else:
                try:
                    scores.write_scores(score_path(output, references, track), result, seen[track], settings)
                except (LockedError, ScoreError) as exc:  # this track only; a full disk stops the run
                    summary.failed.append(exc)
                else:
                    summary.scored.append(track)
                    summary.seconds_scored += seconds
            if progress:
                progress("advance", {"n": 1})
    summary.scored.sort()  # workers finish in any order
    return summary


def _describe(references: References) -> str:
    d = references.describe()
    return f"{d['root']}, {d['subset']} subset" if d["kind"] == "musdb" else d["root"]


def _run_jobs(todo: list[_Job], jobs: int):
    """``(track, json text or error, seconds)`` per job, in order of completion."""
    if jobs <= 1 or len(todo) <= 1:
        for job in todo:
            yield _score_job(job)
        return
    # workers.pool: spawned, SIGINT ignored. Workers keep the parent's BLAS and torch thread settings on purpose: museval's ISR/SIR/SAR,
    # and the fast backend's that follow them, come from a least-squares solve that is
    # ill-conditioned for band-limited references (the toy data's vocals ISR moves by 2 dB between
    # 1 and 2 OpenBLAS threads), so --jobs N must run the very arithmetic --jobs 1 runs.
    # OMP_NUM_THREADS=1 or OPENBLAS_NUM_THREADS=1, set by the user, applies to both.
    pool = workers.pool(min(jobs, len(todo)))
    try:
        futures = [pool.submit(_score_job, job) for job in todo]
        for future in cf.as_completed(futures):
            try:
                result = future.result()
            except cf.process.BrokenProcessPool as exc:
                interrupts.raise_if_received()  # a worker ended by the SIGTERM that stops this run
                raise ScoreError(None, "a scoring worker process died (out of memory?); the tracks scored so far "
                                 "are saved: run again to resume, with fewer --jobs") from exc
            yield result
    finally:
        if interrupts.received() is not None:
            workers.stop(pool)  # SIGTERM or Ctrl-C: do not finish the tracks in flight
        # on an error: drop the queued tracks; finished ones are already written
        pool.shutdown(wait=True, cancel_futures=True)
