"""Where the true sources of an evaluation come from: a MUSDB18 root through musdb, or a folder.

``umxtools eval`` and ``umxtools oracle`` both need, per track, the reference audio of every target
exactly as museval sees it. Two kinds of references:

- :class:`MusdbReferences`: a MUSDB18 (``.stem.mp4``) or MUSDB18-HQ (``is_wav``) root read by
  ``musdb.DB``. The arrays are the very arrays ``museval.eval_mus_track`` takes from a musdb
  track: musdb decodes every file, WAVs included, through ffmpeg as 16-bit PCM (lossless for
  MUSDB18, whose audio is 16-bit; float WAVs such as the toy data's are quantised to 16 bits;
  16-bit and float WAVs are read here by soundfile into the same samples, without ffmpeg),
  and its targets are musdb's (``accompaniment`` = bass + drums + other, summed as musdb sums).
  Estimates and scores of these tracks live under ``<subset>/``, museval's ``eval_mus_dir`` layout.
- :class:`FolderReferences`: ``ROOT/<track>/<source>.wav`` (any source names; ``mixture.wav`` is
  the mixture, else the sum of the sources), read with soundfile at full precision. Targets are
  the sources plus, as in musdb, ``accompaniment`` (every source but vocals) and
  ``linear_mixture`` (all sources). Estimates and scores live directly under their root.

Audio here is float64 of shape ``(nb_samples, nb_channels)``: museval's and musdb's axis order,
not umxtools' ``(channels, samples)``, so that nothing is transposed or copied between musdb and
museval (see :mod:`umxtools.evaluation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from umxtools.audio import _first_line
from umxtools.datasets import no_musdb_tracks
from umxtools.errors import AudioError, DatasetError

MIXTURE = "mixture"
VOCALS = "vocals"
ACCOMPANIMENT = "accompaniment"
LINEAR_MIXTURE = "linear_mixture"
# musdb's targets in musdb's order (musdb/configs/mus.yaml): the order museval stacks them in
MUSDB_TARGETS = ("vocals", "drums", "bass", "other", ACCOMPANIMENT, LINEAR_MIXTURE)
# musdb's subsets (musdb.DB(subsets=...)): the folders of a MUSDB18 root
MUSDB_SUBSETS = ("train", "test")


class ReferenceTrack:
    """One track's true audio: ``mixture()``, ``source(name)`` and ``target(name)``.

    Every array is float64 ``(nb_samples, nb_channels)``.
    """

    name: str
    rate: int
    where: str  # the track's folder or file, for messages
    source_names: tuple[str, ...]
    target_names: tuple[str, ...]

    def mixture(self) -> np.ndarray:
        raise NotImplementedError

    def source(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def target(self, name: str) -> np.ndarray:
        raise NotImplementedError


class _MusdbTrack(ReferenceTrack):
    def __init__(self, track):
        self._track = track  # shared by the process's cached musdb.DB: never mutated here
        self._audio: dict[str, np.ndarray] = {}
        self.name = track.name
        # a wav track's path is its mixture file; a stem track's is its .stem.mp4
        self.where = str(Path(track.path).parent) if track.is_wav else str(track.path)
        self.rate = int(track.rate)
        self.source_names = tuple(track.sources)
        self.target_names = tuple(track.targets)

    def _decoded(self, key: str, source) -> np.ndarray:
        # musdb decodes (an ffmpeg call) on every .audio access: once per stream is enough
        if key not in self._audio:
            audio = _wav_as_musdb_decodes(Path(source.path)) if self._track.is_wav else None
            if audio is None:
                try:
                    audio = source.audio
                except (ValueError, RuntimeError, OSError) as exc:  # musdb/stempeg decoding failures
                    raise AudioError(self.where, f"musdb cannot decode {key} ({_first_line(exc)})") from exc
            self._audio[key] = audio
        return self._audio[key]

    def mixture(self) -> np.ndarray:
        return self._decoded(MIXTURE, self._track)

    def source(self, name: str) -> np.ndarray:
        return self._decoded(name, self._track.sources[name])

    def target(self, name: str) -> np.ndarray:
        # musdb's Target.audio, over the decoded sources: np.sum of the stacked gain * audio (for
        # one source of gain 1 that is the source itself, without the three copies)
        target = self._track.targets[name]
        if len(target.sources) == 1 and target.sources[0].gain == 1:
            return self._decoded(target.sources[0].name, target.sources[0])
        return np.sum(np.array([s.gain * self._decoded(s.name, s) for s in target.sources]), axis=0)


def _wav_as_musdb_decodes(path: Path) -> np.ndarray | None:
    """A MUSDB18-HQ-layout WAV as musdb decodes it, read by soundfile; None where only musdb's own
    decoding gives those samples.

    musdb asks ffmpeg for 16-bit PCM (``s16le``) and divides by 32768 (stempeg). A 16-bit WAV
    (MUSDB18-HQ's) is then its own samples over 32768. ffmpeg converts a 32-bit float WAV (the toy
    data's) with ``av_clip_int16(lrintf(x * 32768))``: rounding half to even and saturating, which
    ``np.rint`` and ``np.clip`` do alike on float32. Both are tested equal to musdb's arrays. This
    spares an ffmpeg process per stream: musdb's decoding took 1.5 s of the 5.5 s that scoring a
    60 s track with 4 targets took; 4.1 s without it. Other formats (24-bit, float64), and
    samples that are not finite, go through musdb.
    """
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError):
        return None  # musdb reports it
    if info.format != "WAV" or info.subtype not in ("PCM_16", "FLOAT"):
        return None
    if info.subtype == "PCM_16":
        samples = sf.read(str(path), dtype="int16", always_2d=True)[0]
    else:
        audio = sf.read(str(path), dtype="float32", always_2d=True)[0]
        if not np.isfinite(audio).all():
            return None
        samples = np.clip(np.rint(audio * np.float32(32768)), -32768, 32767).astype(np.int16)
    return samples.astype(np.float64) / 32768.0


class _FolderTrack(ReferenceTrack):
    def __init__(self, folder: Path):
        self.name = folder.name
        self.where = str(folder)
        files = sorted(p for p in folder.glob("*.wav") if not p.name.startswith("."))
        self._paths = {p.stem: p for p in files if p.stem != MIXTURE}
        if not self._paths:
            raise DatasetError(folder, "no reference sources (expected <source>.wav files)")
        roles = dict(self._paths)
        if (folder / f"{MIXTURE}.wav").exists():
            roles[MIXTURE] = folder / f"{MIXTURE}.wav"
        self._audio: dict[str, np.ndarray] = {}
        rate = None
        for role, path in roles.items():
            data, file_rate = read_wav(path)
            if rate is not None and file_rate != rate:
                raise AudioError(path, f"sample rate {file_rate} Hz, the track's other files are {rate} Hz")
            if self._audio and data.shape != next(iter(self._audio.values())).shape:
                first = next(iter(self._audio))
                raise DatasetError(folder, f"{role} has shape {data.shape} (samples, channels), {first} has {self._audio[first].shape}")
            rate = file_rate
            self._audio[role] = data
        self.rate = int(rate)
        self.source_names = tuple(self._paths)
        extra = []
        if VOCALS in self._paths and len(self._paths) > 1:
            extra.append(ACCOMPANIMENT)
        if len(self._paths) > 1:
            extra.append(LINEAR_MIXTURE)
        self.target_names = (*self.source_names, *[e for e in extra if e not in self._paths])

    def mixture(self) -> np.ndarray:
        if MIXTURE in self._audio:
            return self._audio[MIXTURE]
        return _sum([self._audio[s] for s in self.source_names])

    def source(self, name: str) -> np.ndarray:
        return self._audio[name]

    def target(self, name: str) -> np.ndarray:
        if name in self._paths:
            return self._audio[name]
        if name == ACCOMPANIMENT:
            return _sum([self._audio[s] for s in self.source_names if s != VOCALS])
        if name == LINEAR_MIXTURE:
            return _sum([self._audio[s] for s in self.source_names])
        raise KeyError(name)


def _sum(arrays: list[np.ndarray]) -> np.ndarray:
    # musdb's Target.audio: np.sum of the stacked gain-weighted sources (gains are 1)
    return np.sum(np.array(arrays), axis=0)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """float64 ``(nb_samples, nb_channels)``, as museval reads estimates (``sf.read``)."""
    if not path.exists():
        raise AudioError(path, "no such file")
    try:
        data, rate = sf.read(str(path), always_2d=True, dtype="float64")
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError(path, f"not a readable audio file ({_first_line(exc)})") from exc
    if data.shape[0] == 0:
        raise AudioError(path, "no audio samples")
    if not np.isfinite(data).all():
        raise AudioError(path, "contains NaN or infinite samples")
    return data, int(rate)


@dataclass(frozen=True)
class MusdbReferences:
    """The ``subset`` tracks of a MUSDB18 root, as musdb.DB lists and decodes them."""

    root: str
    is_wav: bool = False
    subset: str = "test"

    @property
    def prefix(self) -> Path:
        """Where this subset's tracks sit in an estimates or scores folder (museval's layout)."""
        return Path(self.subset)

    def describe(self) -> dict:
        return {"kind": "musdb", "root": str(Path(self.root).resolve()), "is_wav": self.is_wav, "subset": self.subset}

    def known_targets(self) -> tuple[str, ...]:
        return MUSDB_TARGETS

    def track_names(self) -> list[str]:
        return sorted(_musdb_db(self.root, self.is_wav, self.subset))

    def load(self, name: str) -> ReferenceTrack:
        tracks = _musdb_db(self.root, self.is_wav, self.subset)
        if name not in tracks:
            raise DatasetError(self.root, f"no track {name!r} in the {self.subset} subset")
        return _MusdbTrack(tracks[name])


@dataclass(frozen=True)
class FolderReferences:
    """``root/<track>/<source>.wav`` track folders."""

    root: str

    @property
    def prefix(self) -> Path:
        return Path()

    def describe(self) -> dict:
        return {"kind": "folder", "root": str(Path(self.root).resolve())}

    def known_targets(self) -> tuple[str, ...]:
        """Every source file name of any track, plus accompaniment and linear_mixture (no audio read)."""
        names = set()
        for track in self.track_names():
            names |= {p.stem for p in (Path(self.root) / track).glob("*.wav") if not p.name.startswith(".")}
        names.discard(MIXTURE)
        extra = [t for t in (ACCOMPANIMENT, LINEAR_MIXTURE) if t not in names and len(names) > 1]
        if VOCALS not in names:
            extra = [t for t in extra if t != ACCOMPANIMENT]
        return (*sorted(names), *extra)

    def track_names(self) -> list[str]:
        root = Path(self.root)
        if not root.is_dir():
            raise DatasetError(root, "no such references folder")
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise DatasetError(root, "no track folders (expected ROOT/<track>/<source>.wav)")
        return names

    def load(self, name: str) -> ReferenceTrack:
        folder = Path(self.root) / name
        if not folder.is_dir():
            raise DatasetError(self.root, f"no track {name!r} (no folder {folder})")
        return _FolderTrack(folder)


References = MusdbReferences | FolderReferences

_DBS: dict[tuple[str, bool, str], dict] = {}


def _musdb_db(root: str, is_wav: bool, subset: str) -> dict:
    """``{name: musdb track}`` of one subset, listed once per process."""
    key = (str(root), is_wav, subset)
    if key in _DBS:
        return _DBS[key]
    path = Path(root)
    if not path.is_dir():
        raise DatasetError(path, "no such dataset folder")
    try:
        import musdb  # imports stempeg, which needs ffmpeg
    except Exception as exc:
        raise DatasetError(path, "musdb needs ffmpeg and ffprobe on PATH (apt-get install ffmpeg)") from exc
    try:
        db = musdb.DB(root=str(path), is_wav=is_wav, subsets=subset)
    except Exception as exc:  # musdb raises RuntimeError/OSError/ValueError for bad roots
        raise DatasetError(path, f"musdb cannot read it ({_first_line(exc)})") from exc
    if not db.tracks:
        raise no_musdb_tracks(path, is_wav, subset)
    _DBS[key] = {t.name: t for t in db.tracks}
    return _DBS[key]
