"""Oracle and mixture baselines, written as an estimates folder that ``umxtools eval`` scores.

The definitions are those of sigsep's oracle methods (sigsep-mus-oracle: ``MIX.py``, ``IRM.py``,
``IBM.py``, ``MWF.py``, the baselines of SiSEC 2018), which compute masks from the true sources:

- ``mix``: every source estimate is the mixture divided by the number of sources.
- ``irm1`` / ``irm2``: ideal ratio mask ``|S_j|^a / (eps + sum_k |S_k|^a)`` applied to the
  mixture STFT, per channel, with ``a = 1`` (magnitude) or ``a = 2`` (power).
- ``ibm``: ideal binary mask, 1 where ``|S_j| / (eps + |X|) >= 0.5`` (magnitude ratio,
  majority vote: the reference's defaults alpha=1, theta=0.5), else 0.
- ``mwf``: multichannel Wiener filter under the local Gaussian model with a time-invariant
  spatial covariance matrix ``R_j(f)`` per source and a PSD ``P_j(f, t)`` re-estimated through
  ``R_j^-1`` (Duong, Vincent & Gribonval 2010), learnt from the true source STFTs.

STFT: ``scipy.signal.stft(x, nperseg=2048)`` (Hann, hop 1024, zero-padded boundaries) and its
``istft``, cut to the track's length, as in the reference. ``accompaniment`` is the sum of the
estimates of every source but vocals, as in the reference.

Deviations from the reference code, both where it does not do what its comments say:
``mwf`` normalises each ``R_j(f)`` to trace ``I`` per frequency (the reference's ``np.trace`` on
the ``(F, I, I)`` array sums the wrong axes), and computes in complex128 throughout (the
reference accumulates the Wiener gain in complex64).

Audio is umxtools' float64 ``(nb_channels, nb_samples)`` here; STFTs are
``(nb_channels, nb_bins, nb_frames)``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from umxtools import __version__, audio, fileio
from umxtools.errors import DatasetError, LockedError, OutputError, UmxError, UsageError, check_choice
from umxtools.references import ACCOMPANIMENT, VOCALS, References

if TYPE_CHECKING:
    from umxtools.cache import Shard
    from umxtools.progress import Progress

NFFT = 2048  # the reference's nperseg; scipy's default overlap is half of it
EPS = np.finfo(np.float64).eps  # the reference's guard against division by zero
MANIFEST = "umxtools-oracle.json"
RECORD = "oracle.json"  # per track, written last: the track is complete when it is there
RECORD_FORMAT = "umxtools-oracle-track"
_MWF_BLOCK = 1024  # frames per block of the Wiener filter: bounds memory on long tracks

Method = Callable[[np.ndarray, dict[str, np.ndarray]], dict[str, np.ndarray]]


def _stft(x: np.ndarray) -> np.ndarray:
    """``(nb_channels, nb_samples)`` -> ``(nb_channels, nb_bins, nb_frames)`` complex."""
    import scipy.signal  # the CLI imports this module for its method names

    return scipy.signal.stft(x, nperseg=NFFT)[-1]


def _istft(spec: np.ndarray, nb_samples: int) -> np.ndarray:
    """``(nb_channels, nb_bins, nb_frames)`` -> ``(nb_channels, nb_samples)``."""
    import scipy.signal

    return scipy.signal.istft(spec)[1][..., :nb_samples]


def mixture_baseline(mixture: np.ndarray, sources: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every source estimate is ``mixture / nb_sources``."""
    return {name: mixture / len(sources) for name in sources}


def ratio_mask(mixture: np.ndarray, sources: dict[str, np.ndarray], alpha: float = 2) -> dict[str, np.ndarray]:
    """Ideal ratio mask of exponent ``alpha`` on each channel."""
    nb_samples = mixture.shape[-1]
    X = _stft(mixture)  # (nb_channels, nb_bins, nb_frames)
    P = {name: np.abs(_stft(s)) ** alpha for name, s in sources.items()}
    model = EPS
    for p in P.values():  # summed from eps in source order, as the reference does
        model = model + p
    return {name: _istft(X * (P[name] / model), nb_samples) for name in sources}


def binary_mask(mixture: np.ndarray, sources: dict[str, np.ndarray], alpha: float = 1, theta: float = 0.5) -> dict[str, np.ndarray]:
    """Ideal binary mask: the mixture bin goes to a source whose ratio to it reaches ``theta``."""
    nb_samples = mixture.shape[-1]
    X = _stft(mixture)
    out = {}
    for name, s in sources.items():
        ratio = np.abs(_stft(s)) ** alpha / (EPS + np.abs(X) ** alpha)
        out[name] = _istft(X * (ratio >= theta), nb_samples)
    return out


def _inv(M: np.ndarray) -> np.ndarray:
    """Inverse of ``(..., I, I)`` matrices; for I = 2 the reference's regularised explicit formula."""
    if M.shape[-1] != 2:
        return np.linalg.inv(M + EPS * np.eye(M.shape[-1]))
    inv_det = 1.0 / (EPS + M[..., 0, 0] * M[..., 1, 1] - M[..., 0, 1] * M[..., 1, 0])
    out = np.empty(M.shape, dtype=np.complex128)
    out[..., 0, 0] = inv_det * M[..., 1, 1]
    out[..., 1, 0] = -inv_det * M[..., 1, 0]
    out[..., 0, 1] = -inv_det * M[..., 0, 1]
    out[..., 1, 1] = inv_det * M[..., 0, 0]
    return out


def multichannel_wiener(mixture: np.ndarray, sources: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Oracle multichannel Wiener filter with time-invariant spatial covariances."""
    nb_samples = mixture.shape[-1]
    X = _stft(mixture)
    nb_channels, nb_bins, nb_frames = X.shape
    eye = np.eye(nb_channels)
    P, R = {}, {}
    for name, s in sources.items():
        Y = _stft(s)  # (nb_channels, nb_bins, nb_frames)
        # first PSD guess: the spectrogram averaged over channels
        P0 = np.mean(np.abs(Y) ** 2, axis=0)  # (nb_bins, nb_frames)
        # spatial covariance: the observed Y Y^H weighted by 1/P (the model is P_j(f,t) R_j(f))
        Rj = np.einsum("aft,bft->fab", Y / (EPS + P0), Y.conj()) / nb_frames  # (nb_bins, I, I)
        trace = np.real(np.trace(Rj, axis1=1, axis2=2))[:, None, None]
        Rj = Rj * nb_channels / (EPS + trace) + EPS * eye
        # refined PSD: P = tr(R^-1 Y Y^H) / I, better when the channels are correlated
        Rinv = _inv(Rj)
        P[name] = np.real(np.einsum("fab,bft,aft->ft", Rinv, Y, Y.conj())) / nb_channels
        R[name] = Rj
    out = {name: np.zeros_like(X) for name in sources}
    for start in range(0, nb_frames, _MWF_BLOCK):
        frames = slice(start, start + _MWF_BLOCK)
        # mixture covariance: the sum of the sources' P_j R_j, then the gain P_j R_j Cxx^-1
        Cxx = sum(P[n][:, frames, None, None] * R[n][:, None] for n in sources)  # (nb_bins, frames, I, I)
        inv_cxx = _inv(Cxx)
        for name in sources:
            gain = (P[name][:, frames, None, None] * R[name][:, None]) @ inv_cxx  # (nb_bins, frames, I, I)
            out[name][:, :, frames] = np.einsum("ftab,bft->aft", gain, X[:, :, frames])
    return {name: _istft(spec, nb_samples) for name, spec in out.items()}


METHODS: dict[str, Method] = {
    "mix": mixture_baseline,
    "irm1": partial(ratio_mask, alpha=1),
    "irm2": partial(ratio_mask, alpha=2),
    "ibm": partial(binary_mask, alpha=1, theta=0.5),
    "mwf": multichannel_wiener,
}


def oracle_estimates(method: str, mixture: np.ndarray, sources: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Estimates of every source, plus ``accompaniment`` when there are vocals and other sources.

    ``mixture`` and each source: ``(nb_channels, nb_samples)``; so is every estimate.
    """
    check_choice(method, METHODS, "oracle method")
    estimates = METHODS[method](mixture, sources)
    others = [n for n in sources if n != VOCALS]
    if VOCALS in sources and others:
        accompaniment = 0
        for n in others:  # the reference accumulates the non-vocal estimates in source order
            accompaniment = accompaniment + estimates[n]
        estimates[ACCOMPANIMENT] = accompaniment
    return estimates


@dataclass
class OracleSummary:
    """What :func:`write_oracle` did, track by track."""

    output: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # complete before this run
    failed: list[UmxError] = field(default_factory=list)  # another process is writing the track


def write_oracle(
    references: References,
    method: str,
    output: str | Path,
    targets: list[str] | None = None,
    shard: Shard | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> OracleSummary:
    """Write ``method``'s estimates of every reference track as an estimates folder.

    Layout: ``output/<subset>/<track>/<target>.wav`` for MUSDB18 references,
    ``output/<track>/<target>.wav`` for a folder (museval's layout), 32-bit float WAV, a record
    ``<track>/oracle.json`` per track (:data:`RECORD`) and ``output/umxtools-oracle.json``
    describing the method and the references.

    ``output`` must be new, empty, or a folder ``oracle`` made (its :data:`umxtools.fileio.MARKER`);
    it is never the dataset, inside it or around it. A folder of another method or other
    references is refused unless ``force``, which then removes the folder ``oracle`` made before
    writing it again (so no estimate of the old method stays beside the new ones). A folder of
    anything else (a model's estimates, a dataset) is refused, ``force`` or not.

    Requeue-safe, track by track: a track is written into a staging folder beside its own
    (``.<track>.<pid>-<random>.partial``) and renamed into place with its record, under the
    track's lock (:func:`umxtools.fileio.exclusive`); a track whose record says it is complete
    (this method, these references, the targets asked for, files of the recorded sizes) is
    skipped unless ``force``, and staging folders of killed runs are removed when their track is
    next visited. An exception (:class:`umxtools.interrupts.Interrupted` included) removes the
    staging folder of the track being written; finished tracks stay. ``shard`` writes tracks
    ``i`` (sorted by name) with ``i % N == K``; shards share ``output``. A track another process
    is writing is skipped and reported in ``failed``.
    """
    from umxtools.cache import Shard  # h5py: only when estimates are written

    check_choice(method, METHODS, "oracle method")
    for target in targets or ():
        fileio.check_name(target, "target")
    shard = shard or Shard()
    output = Path(output)
    manifest = {"format": "umxtools-oracle", "method": method, "references": references.describe(),
                "stft": {"library": "scipy.signal.stft", "nperseg": NFFT, "window": "hann", "hop": NFFT // 2},
                "reference": "sigsep-mus-oracle", "umxtools_version": __version__}
    fileio.check_disjoint(output, [references.root], "dataset")
    names = references.track_names()
    for name in names:
        fileio.check_name(name, "track", references.root)
    selected = [name for i, name in enumerate(names) if shard.selects(i)]
    if not selected:
        raise UsageError(None, f"shard {shard} selects none of the {len(names)} tracks of {references.root}; "
                               f"use at most {len(names)} shards")
    # shards of one array start together: the claim (and a --force removal) happens under the
    # manifest's lock, taken in turn, so none sees another's marker without its manifest
    if output.exists() and not output.is_dir():
        raise OutputError(output, "is a file, not a folder")
    with fileio.exclusive(output / MANIFEST, wait=True):
        _claim(output, manifest, force)
        fileio.write_text(output / MANIFEST, json.dumps(manifest, indent=2))
    summary = OracleSummary(output)
    if progress:
        progress("total", {"n": len(selected)})
    for name in selected:
        folder = output / references.prefix / name
        try:
            with fileio.exclusive(folder):
                fileio.remove_leftovers(folder, ".partial")  # staging folders of killed runs
                if not force and track_problem(folder, method, references, targets) is None:
                    summary.skipped.append(name)
                else:
                    _write_track(references, name, method, folder, targets)
                    summary.written.append(name)
        except LockedError as exc:
            summary.failed.append(exc)
        if progress:
            progress("advance", {"n": 1})
    return summary


def _write_track(references: References, name: str, method: str, folder: Path, targets: list[str] | None) -> None:
    """Compute one track's estimates into a staging folder, then put it in place of ``folder``."""
    ref = references.load(name)
    sources = {s: ref.source(s).T for s in ref.source_names}
    try:
        estimates = oracle_estimates(method, ref.mixture().T, sources)
    except (ValueError, FloatingPointError) as exc:  # numpy's LinAlgError is a ValueError
        raise DatasetError(ref.where, f"oracle {method} cannot be computed for this track ({exc})") from exc
    wanted = targets or list(estimates)
    unknown = [t for t in wanted if t not in estimates]
    if unknown:
        raise UsageError(None, f"no oracle estimate for target(s) {', '.join(unknown)}; {method} gives {', '.join(estimates)}")
    staging = fileio.temp_path(folder, ".partial")
    try:
        try:
            staging.mkdir(parents=True)
        except OSError as exc:
            raise fileio.output_error(folder, exc) from exc
        files = {}
        for target in wanted:
            path = fileio.safe_child(staging, f"{target}.wav", "target", ref.where)
            _write_estimate(path, estimates[target], ref.rate, folder / path.name)
            files[target] = path.stat().st_size
        record = {"format": RECORD_FORMAT, "track": name, "method": method, "references": references.describe(),
                  "targets": wanted, "every_target": targets is None, "files": files, "umxtools_version": __version__}
        fileio.write_json(staging / RECORD, record, indent=2)  # last: what makes the track complete
        try:
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise OutputError(folder, "is not a track folder oracle wrote (a link or a file); remove it yourself")
            if folder.exists():  # an incomplete or outdated track of this oracle folder
                shutil.rmtree(folder)
            os.replace(staging, folder)
        except OSError as exc:
            raise fileio.output_error(folder, exc) from exc
    finally:
        if staging.exists():  # any error, Interrupted included: no partial folder stays
            shutil.rmtree(staging, ignore_errors=True)


def track_problem(folder: str | Path, method: str | None, references: References | None, targets: list[str] | None) -> str | None:
    """Why ``folder`` does not hold complete oracle estimates of ``targets`` (None: it does).

    Complete: ``folder/oracle.json`` exists and records ``method`` and ``references`` (when not
    None), every target of ``targets`` (None: every estimate the method gives), and files of the
    recorded sizes. ``umxtools eval`` asks this of every track of a folder ``oracle`` made.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "no estimates of this track"
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return f"incomplete oracle estimates (no {RECORD}: the run writing them was stopped, or an older umxtools wrote them)"
    if method is not None and record.get("method") != method:
        return f"{record.get('method')} estimates, not {method}"
    if references is not None and record.get("references") != references.describe():
        return "estimates of other references"
    recorded = record.get("targets") if isinstance(record.get("targets"), list) else []
    if targets is None and not record.get("every_target"):
        return f"estimates of {', '.join(map(str, recorded))} only"
    missing = [t for t in targets or () if t not in recorded]
    if missing:
        return f"no oracle estimate of {', '.join(missing)}"
    files = record.get("files") if isinstance(record.get("files"), dict) else {}
    for target in recorded:
        try:
            size = (folder / f"{target}.wav").stat().st_size
        except OSError:
            return f"{target}.wav is missing"
        if size != files.get(target):
            return f"{target}.wav changed since oracle wrote it"
    return None


def made_for(estimates: str | Path, references: References) -> bool:
    """Whether ``estimates`` is a folder ``oracle`` made from ``references`` (so it holds every track)."""
    if fileio.made_by(estimates) != "oracle":
        return False
    try:
        manifest = json.loads((Path(estimates) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("references") == references.describe()


def _claim(output: Path, manifest: dict, force: bool) -> None:
    """Make ``output`` this oracle run's folder (see :func:`write_oracle`), before any track is computed."""
    if fileio.made_by(output) == "oracle":
        try:
            old = json.loads((output / MANIFEST).read_text())
        except (OSError, ValueError):
            old = {}
        old = old if isinstance(old, dict) else {}
        if old.get("method") != manifest["method"] or old.get("references") != manifest["references"]:
            if not force:
                refs = old.get("references")
                root = refs.get("root") if isinstance(refs, dict) else None
                raise OutputError(output, f"holds {old.get('method', 'unknown')} estimates of {root or 'unknown references'}; "
                                          "write into another folder or pass --force")
            try:
                fileio.remove_tree(output, fileio.MARKER)
            except OSError as exc:
                raise fileio.output_error(output, exc) from exc
    fileio.claim_folder(output, "oracle")


def _write_estimate(path: Path, estimate: np.ndarray, rate: int, final: Path) -> None:
    """Write one estimate at ``path`` (in the staging folder); errors name ``final``, its place."""
    import soundfile as sf

    try:
        audio.write(path, estimate, rate)
    except sf.SoundFileError as exc:
        # libsndfile reports a write that failed midway (a full disk, a quota) as a "System error"
        raise OutputError(final, f"cannot write the estimate ({audio._first_line(exc)}); check the free space and quota there") from exc
    except OutputError as exc:
        raise OutputError(final, exc.problem) from exc
