"""Scoring estimates: museval's BSSEval v4 per track, resumable and parallel, plus the MDX SDR.

Layout, museval's own (``museval.eval_mus_dir``):

- estimates: ``ESTIMATES/<subset>/<track>/<target>.wav`` for MUSDB18 references,
  ``ESTIMATES/<track>/<target>.wav`` for a folder of references;
- scores: one JSON per track at ``SCORES/<subset>/<track>.json`` (or ``SCORES/<track>.json``), in
  the format ``museval.TrackStore`` writes (BSSEval v4 frame scores, 1 s windows and hops, values
  quantised to 1e-5, infinities stored as NaN), so museval's ``EvalStore``/``MethodStore`` read
  them too. A ``umxtools`` block beside museval's keys records the settings, the estimate files
  (size and mtime, for resume) and the MDX whole-track SDR (``uSDR``) per target.

Per track the scores are what ``museval.eval_mus_track`` computes for the same estimates: the
targets present are scored jointly (BSSEval v4 projects each estimate on all references of its
group), and when both ``vocals`` and ``accompaniment`` are scored they form a second, separate
group (museval's vocals/accompaniment scenario; the vocals scores of the first group are dropped).
A single target cannot be scored (museval returns nothing for it). Estimates longer than the
references are truncated and shorter ones zero-padded (``museval.pad_or_truncate``), the latter
with a warning naming the file (a truncated file is what a killed writer leaves); frames where
any reference or estimate of the group is silent are NaN (museval's rule); a source silent over
the whole track is an error, as in museval.

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

Scoring backends are a registry (:data:`BACKENDS`): a backend computes one group's frame
scores with museval's ``evaluate`` signature. ``fast``, the default, is :mod:`umxtools.metrics`
(museval's BSSEval v4 in torch, within 0.01 dB of museval on every frame, and many times
faster: docs/metrics.md); ``museval`` is museval itself. Every score file records which one made it.

Audio is float64 ``(nb_samples, nb_channels)`` here, museval's axis order (see
:mod:`umxtools.references`).
"""

from __future__ import annotations

import concurrent.futures as cf
import warnings
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from umxtools import __version__, fileio, interrupts, oracle, scores, workers
from umxtools.audio import _first_line
from umxtools.errors import (
    AudioError,
    DatasetError,
    LockedError,
    ScoreError,
    UmxError,
    UsageError,
)
# the score-file format lives in umxtools.scores; these names stay importable from here
from umxtools.scores import SCORE_FORMAT, SCORE_FORMAT_VERSION, read_scores, score_path, to_json  # noqa: F401  (re-exported)
from umxtools.references import (
    ACCOMPANIMENT,
    MUSDB_TARGETS,
    VOCALS,
    References,
    ReferenceTrack,
    read_wav,
)

if TYPE_CHECKING:
    from umxtools.cache import Shard
    from umxtools.progress import Progress

MODE = "v4"
WIN = 1.0  # seconds: SiSEC 2018's (and museval's default) 1 s windows and hops
HOP = 1.0
METRICS = ("SDR", "SIR", "ISR", "SAR")
# The MDX challenge's SDR (Mitsufuji et al. 2021, "Music Demixing Challenge 2021"), called nSDR in
# the Demucs papers and uSDR ("utterance" SDR) in the SDX 2023 challenge: one number per target
# and track, no frames, no distortion filter.
USDR = "uSDR"
USDR_DELTA = 1e-7  # the challenge evaluator's guard against log(0) and division by zero
USDR_DEFINITION = (
    "MDX whole-track SDR: 10*log10((sum(s**2) + 1e-7) / (sum((s - e)**2) + 1e-7)) over all samples and "
    "channels, s the reference, e the estimate padded/truncated to its length"
)
ESTIMATE_SUFFIX = ".wav"


# --- backends ------------------------------------------------------------------------------------

Backend = Callable[[list[np.ndarray], list[np.ndarray], int, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
"""``(references, estimates, win, hop) -> (SDR, ISR, SIR, SAR)``.

``references`` and ``estimates``: one ``(nb_samples, nb_channels)`` float64 array per target of
the group, of equal shapes; ``win`` and ``hop`` in samples. Returns four ``(nb_targets, nb_frames)``
arrays, NaN for silent frames: ``museval.evaluate``'s contract with ``mode='v4'``.
"""


def _museval_backend(references, estimates, win, hop):
    import museval  # imports pandas and musdb: only where scores are computed

    return museval.evaluate(references, estimates, win=win, hop=hop, mode=MODE)


def _fast_backend(references, estimates, win, hop):
    from umxtools import metrics  # imports torch: only where scores are computed

    return metrics.evaluate(references, estimates, win=win, hop=hop, mode=MODE)


BACKENDS: dict[str, Backend] = {"fast": _fast_backend, "museval": _museval_backend}
#: ``fast`` (umxtools.metrics: museval's numbers, tests/test_metrics.py and tests/test_eval.py hold
#: it to 0.01 dB of museval on every frame) unless ``--backend museval`` asks for museval itself.
DEFAULT_BACKEND = "fast"


# --- one track -----------------------------------------------------------------------------------


def bsseval_groups(targets: list[str]) -> list[tuple[list[str], list[str]]]:
    """museval's grouping of targets: ``[(scored jointly, reported), ...]``, in museval's order.

    ``museval.eval_mus_track``: with both vocals and accompaniment, accompaniment leaves the main
    group and vocals/accompaniment are scored as a second group, the vocals scores of the main
    group being dropped; a main group of one target is not scored.
    """
    has_acc = VOCALS in targets and ACCOMPANIMENT in targets
    main = [t for t in targets if not (has_acc and t == ACCOMPANIMENT)]
    groups = []
    if len(main) >= 2:
        groups.append((main, [t for t in main if not (has_acc and t == VOCALS)]))
    if has_acc:
        groups.append(([VOCALS, ACCOMPANIMENT], [VOCALS, ACCOMPANIMENT]))
    return groups


def fit_length(estimate: np.ndarray, nb_samples: int) -> np.ndarray:
    """museval's ``pad_or_truncate`` for one ``(nb_samples, nb_channels)`` estimate."""
    if estimate.shape[0] >= nb_samples:
        return estimate[:nb_samples]
    return np.pad(estimate, [(0, nb_samples - estimate.shape[0]), (0, 0)], mode="constant")


def whole_track_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """The MDX challenge SDR of one target over the whole track (see :data:`USDR_DEFINITION`)."""
    num = np.sum(np.square(reference)) + USDR_DELTA
    den = np.sum(np.square(reference - estimate)) + USDR_DELTA
    return float(10 * np.log10(num / den))


def _silent(audio: np.ndarray) -> bool:
    # museval.metrics._any_source_silent: every sample's channel sum is exactly zero
    return bool(np.all(np.sum(audio, axis=1) == 0))


def canonical_order(targets) -> list[str]:
    """musdb's target order first (the order museval stacks them), then the others by name."""
    targets = list(dict.fromkeys(targets))
    known = [t for t in MUSDB_TARGETS if t in targets]
    return known + sorted(t for t in targets if t not in MUSDB_TARGETS)


def score_track(
    references: References,
    track: str,
    estimate_dir: str | Path,
    targets: list[str],
    backend: str = DEFAULT_BACKEND,
) -> dict:
    """BSSEval v4 frame scores and uSDR of one track's estimates.

    Args:
        references: where the true sources come from.
        track: the track's name in ``references``.
        estimate_dir: the folder holding ``<target>.wav`` for every target.
        targets: the targets to score (at least two, or vocals and accompaniment).
        backend: a key of :data:`BACKENDS`.

    Returns:
        The score document: museval's TrackStore dict (``targets``, ``museval_version``) plus
        the ``umxtools`` block. Raises :class:`AudioError`, :class:`DatasetError` or
        :class:`ScoreError` for estimates or references that cannot be scored.
    """
    estimate_dir = Path(estimate_dir)
    targets = canonical_order(targets)
    groups = bsseval_groups(targets)
    if not groups:
        raise UsageError(None, _single_target_problem(targets))
    ref = references.load(track)
    refs, ests, lengths, files = _load_audio(ref, estimate_dir, targets)
    doc = _bsseval(track, groups, refs, ests, ref.rate, backend, estimate_dir)
    nb_samples = next(iter(refs.values())).shape[0]
    doc["umxtools"] = {
        "format": SCORE_FORMAT,
        "format_version": SCORE_FORMAT_VERSION,
        "umxtools_version": __version__,
        "track": track,
        **_run_settings(backend, targets),
        "bsseval_groups": [group for group, _ in groups],
        "sample_rate": ref.rate,
        "nb_samples": nb_samples,
        "duration_s": nb_samples / ref.rate,
        "references": references.describe(),
        "estimates": files,
        # museval pads shorter estimates with zeros and truncates longer ones
        "estimate_nb_samples": lengths,
        "whole_track_sdr": {
            "name": USDR,
            "definition": USDR_DEFINITION,
            "values": {t: whole_track_sdr(refs[t], ests[t]) for t in targets},
        },
    }
    return doc


def _load_audio(ref: ReferenceTrack, estimate_dir: Path, targets: list[str]):
    """References and length-fitted estimates per target, checked as museval would need them.

    Returns ``(references, estimates, estimate lengths, estimate file records)``; arrays are
    ``(nb_samples, nb_channels)`` float64.
    """
    absent = [t for t in targets if t not in ref.target_names]
    if absent:
        raise DatasetError(ref.where, f"no reference for target(s) {', '.join(absent)}; it has {', '.join(ref.target_names)}")
    refs, ests, lengths, files = {}, {}, {}, []
    for target in targets:
        path = fileio.safe_child(estimate_dir, f"{target}{ESTIMATE_SUFFIX}", "target")
        if not path.exists():
            wanted = ", ".join(f"{t}{ESTIMATE_SUFFIX}" for t in targets)
            raise DatasetError(path, f"missing estimate for target {target!r} (every scored track needs {wanted})")
        st = path.stat()  # before reading: a file rewritten meanwhile then looks changed on resume
        data, rate = read_wav(path)
        reference = ref.target(target)
        if rate != ref.rate:
            raise AudioError(path, f"sample rate {rate} Hz, the references are {ref.rate} Hz (resample the estimates)")
        if data.shape[1] != reference.shape[1]:
            raise AudioError(path, f"{data.shape[1]} channel(s), the reference has {reference.shape[1]}")
        if _silent(reference):
            raise DatasetError(ref.where, f"reference {target!r} is silent over the whole track; BSSEval v4 cannot score "
                               "it (museval refuses silent sources): leave the target out with --targets")
        if data.shape[0] < reference.shape[0]:
            # a truncated file is what a writer that was killed leaves: never padded in silence
            missing = reference.shape[0] - data.shape[0]
            warnings.warn(f"{path}: {data.shape[0]} samples, {missing} ({missing / ref.rate:.2f} s) shorter than the "
                          f"reference; zero-padded as museval does (a truncated file? make it again)", stacklevel=2)
        estimate = fit_length(data, reference.shape[0])
        if _silent(estimate):
            raise AudioError(path, "silent over the whole track (all zeros); BSSEval v4 cannot score it (museval "
                             "refuses silent estimates)")
        refs[target], ests[target], lengths[target] = reference, estimate, data.shape[0]
        files.append({"target": target, "path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return refs, ests, lengths, files


def _bsseval(track: str, groups, refs: dict, ests: dict, rate: int, backend: str, where: Path) -> dict:
    """museval's TrackStore document of every group's reported targets, in museval's order."""
    from museval import TrackStore  # imports pandas: only where scores are computed

    store = TrackStore(win=WIN, hop=HOP, track_name=track)
    win, hop = int(WIN * rate), int(HOP * rate)
    for group, reported in groups:
        try:
            # log10(0) for an all-zero error is +inf (stored as NaN, as museval stores it): no warning
            with np.errstate(divide="ignore", invalid="ignore"):
                sdr, isr, sir, sar = BACKENDS[backend]([refs[t] for t in group], [ests[t] for t in group], win, hop)
        except (ValueError, RuntimeError, np.linalg.LinAlgError) as exc:  # torch's linalg errors are RuntimeErrors
            raise ScoreError(where, f"{backend} cannot score {', '.join(group)}: {_first_line(exc)}") from exc
        for i, target in enumerate(group):
            if target in reported:
                values = {"SDR": sdr[i].tolist(), "SIR": sir[i].tolist(), "ISR": isr[i].tolist(), "SAR": sar[i].tolist()}
                store.add_target(target_name=target, values=values)
    store.validate()
    return store.scores


def _run_settings(backend: str, targets: list[str]) -> dict:
    return {"backend": backend, "mode": MODE, "win": WIN, "hop": HOP, "targets": list(targets)}


def _single_target_problem(targets: list[str]) -> str:
    return (f"cannot score {', '.join(targets) or 'no targets'} alone: BSSEval v4 scores targets jointly and museval "
            "scores nothing for a single target; score at least two targets (e.g. --targets vocals,accompaniment)")


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

    if backend not in BACKENDS:
        raise UsageError(None, f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
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
