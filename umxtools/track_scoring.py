"""Scoring one track: museval's BSSEval v4 per group of targets, and the MDX whole-track SDR.

Per track the scores are what ``museval.eval_mus_track`` computes for the same estimates: the
targets present are scored jointly (BSSEval v4 projects each estimate on all references of its
group), and when both ``vocals`` and ``accompaniment`` are scored they form a second, separate
group (museval's vocals/accompaniment scenario; the vocals scores of the first group are dropped).
A single target cannot be scored (museval returns nothing for it). Estimates longer than the
references are truncated and shorter ones zero-padded (``museval.pad_or_truncate``), the latter
with a warning naming the file (a truncated file is what a killed writer leaves); frames where
any reference or estimate of the group is silent are NaN (museval's rule); a source silent over
the whole track is an error, as in museval.

Scoring backends are a registry (:data:`BACKENDS`): a backend computes one group's frame
scores with museval's ``evaluate`` signature. ``fast``, the default, is :mod:`umxtools.metrics`
(museval's BSSEval v4 in torch, within 0.01 dB of museval on every frame, and many times
faster: docs/metrics.md); ``museval`` is museval itself. Every score file records which one made it.

Audio is float64 ``(nb_samples, nb_channels)`` here, museval's axis order (see
:mod:`umxtools.references`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from umxtools import __version__, fileio
from umxtools.audio import _first_line
from umxtools.errors import AudioError, DatasetError, ScoreError, UsageError
from umxtools.references import ACCOMPANIMENT, MUSDB_TARGETS, VOCALS, References, ReferenceTrack, read_wav
from umxtools.scores import SCORE_FORMAT, SCORE_FORMAT_VERSION

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
