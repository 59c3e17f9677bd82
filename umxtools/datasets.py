"""Sources of tracks: MUSDB18 through musdb, folder layouts, and a user's own Python dataset.

Every kind lists its tracks as :class:`TrackRef` objects (small, picklable: they travel to decode
worker processes) and :func:`load_track` turns one into a :class:`Track` of float32 audio.
The folder layouts are open-unmix's custom dataset kinds (``openunmix/data.py``):

- ``aligned``: ``ROOT/<track>/`` holds an input (the mixture) and an output (the target) file;
- ``sourcefolder``: ``ROOT/<source>/*.wav``: single-source files, mixed at random when loading;
- ``trackfolder``: ``ROOT/<track>/<source>.wav``: stems per track, a fixed set of sources or,
  with ``variable_sources``, whatever each track holds (missing sources are silence).

Audio shapes: ``(channels, samples)``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umxtools import audio, fileio
from umxtools.errors import AudioError, DatasetError, UmxError, UsageError

MUSDB_SOURCES = ("vocals", "drums", "bass", "other")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3", ".mp4", ".m4a")
LAYOUTS = ("aligned", "sourcefolder", "trackfolder")


@dataclass(frozen=True)
class TrackRef:
    """Where one track's audio comes from.

    ``files`` maps a role (``mixture`` or a source name; ``stems`` for a multi-stream file) to a
    path. ``module`` tracks name ``module_spec``/``module_args`` and their ``index`` instead.
    """

    name: str
    kind: str
    files: dict[str, str] = field(default_factory=dict)
    stem_order: tuple[str, ...] = ()
    module_spec: str = ""
    module_args: str = "{}"
    index: int = -1


@dataclass
class Track:
    """Decoded audio of one track: ``sources[name]`` and ``mixture`` are ``(channels, samples)``."""

    name: str
    sample_rate: int
    sources: dict[str, np.ndarray]
    mixture: np.ndarray | None
    inputs: list[str]

    @property
    def nb_samples(self) -> int:
        first = self.mixture if self.mixture is not None else next(iter(self.sources.values()))
        return first.shape[-1]


# --- listing ---------------------------------------------------------------------------------


def musdb_tracks(
    root: str | Path,
    is_wav: bool = False,
    subsets: str = "train",
    split: str | None = "train",
    valid_tracks: list[str] | None = None,
) -> list[TrackRef]:
    """Tracks of a MUSDB18 (``.stem.mp4``) or MUSDB18-HQ (``is_wav``) root, listed by musdb.DB.

    ``split`` selects musdb's own train/valid split of the train subset; ``valid_tracks`` replaces
    musdb's validation list (needed for roots whose tracks are not MUSDB18's, such as the toy data).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "no such dataset folder")
    if split is not None and subsets != "train":
        raise UsageError(None, "--split selects from the train subset: use it with --subset train alone (--split all for the others)")
    try:
        import musdb  # imports stempeg, which needs ffmpeg
    except Exception as exc:
        raise DatasetError(root, "musdb needs ffmpeg and ffprobe on PATH (apt-get install ffmpeg)") from exc
    try:
        # the whole subset, split here: an empty split then says why it is empty
        db = musdb.DB(root=str(root), is_wav=is_wav, subsets=subsets, split=None)
    except Exception as exc:  # musdb raises RuntimeError/OSError/ValueError for bad roots
        raise DatasetError(root, f"musdb cannot read it ({audio._first_line(exc)})") from exc
    tracks = list(db.tracks)
    if not tracks:
        raise no_musdb_tracks(root, is_wav, subsets)
    if split is not None:
        valid = set(valid_tracks or db.setup["validation_tracks"])
        if valid_tracks:
            unknown = valid - {t.name for t in tracks}
            if unknown:
                raise DatasetError(root, f"--valid-tracks names tracks not in the {subsets} subset: {sorted(unknown)}")
        chosen = [t for t in tracks if (t.name in valid) == (split == "valid")]
        if not chosen:
            raise _empty_split(root / subsets, split, len(tracks), bool(valid_tracks), db.setup["validation_tracks"])
        tracks = chosen
    if is_wav:
        _check_wav_tracks(root / subsets, [Path(t.path).parent for t in tracks], [db.setup["mixture"], *db.setup["sources"].values()])
    refs = []
    stem_ids = {name: int(i) for name, i in db.setup["stem_ids"].items()}  # mixture 0, drums 1, ...
    stem_order = tuple(sorted(stem_ids, key=stem_ids.get))
    for t in tracks:
        if is_wav:
            folder = Path(t.path).parent  # musdb gives the mixture file of a wav track
            files = {"mixture": str(folder / db.setup["mixture"])}
            files.update({s: str(folder / db.setup["sources"][s]) for s in MUSDB_SOURCES})
            refs.append(TrackRef(name=t.name, kind="musdb", files=files))
        else:
            refs.append(TrackRef(name=t.name, kind="musdb", files={"stems": str(t.path)}, stem_order=stem_order))
    return refs


def no_musdb_tracks(root: str | Path, is_wav: bool, subset: str) -> DatasetError:
    """Why musdb finds no track in ``root/subset``: the error names what is there instead."""
    root = Path(root)
    folder = root / subset
    if not folder.is_dir():
        hint = ""
        if root.name in ("train", "test") and (root.parent / subset).is_dir():
            hint = f"; {root} is itself a subset folder: pass its parent {root.parent}"
        return DatasetError(root, f"no {subset}/ folder (a MUSDB18 root holds train/ and test/){hint}")
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    tracks = [p for p in entries if p.is_dir()]
    stems = [p for p in entries if p.name.endswith(".stem.mp4")]
    if is_wav and stems:
        files = f"{len(stems)} .stem.mp4 file" + ("s" if len(stems) > 1 else "")
        return DatasetError(folder, f"{files} and no track folders: this is MUSDB18, not MUSDB18-HQ; drop --is-wav")
    if is_wav:
        return DatasetError(folder, "no track folders (MUSDB18-HQ: <track>/mixture.wav, vocals.wav, drums.wav, bass.wav, other.wav)")
    if tracks:
        return DatasetError(folder, f"{len(tracks)} track folders and no .stem.mp4 files: this looks like MUSDB18-HQ; pass --is-wav")
    return DatasetError(folder, "no .stem.mp4 files (MUSDB18: <track>.stem.mp4; MUSDB18-HQ: track folders of wavs, with --is-wav)")


def _empty_split(folder: Path, split: str, count: int, own_list: bool, musdb_list: list[str]) -> DatasetError:
    """Why ``--split`` selects none of the ``count`` tracks of ``folder``."""
    if split == "valid":  # with --valid-tracks every name is known, so this is musdb's list
        example = musdb_list[0] if musdb_list else "..."
        return DatasetError(folder, f"--split valid selects none of the {count} tracks: musdb's validation list names MUSDB18's "
                                    f"tracks ({example!r}, ...); pass --valid-tracks NAME,... to choose the validation tracks")
    named = "--valid-tracks names" if own_list else "musdb's validation list names"
    return DatasetError(folder, f"--split train selects none of the {count} tracks: {named} all of them; use --split all, or "
                                "fewer --valid-tracks")


def _check_wav_tracks(folder: Path, tracks: list[Path], names: list[str]) -> None:
    """Every MUSDB18-HQ track folder holds the mixture and the four stems (musdb lists a folder
    whatever it holds, so a missing file would surface only when decoding)."""
    complete = [t for t in tracks if all((t / n).is_file() for n in names)]
    if not complete:
        holds = sorted(p.name for p in tracks[0].iterdir() if not p.name.startswith(".")) if tracks[0].is_dir() else []
        what = ", ".join(holds[:6]) + (", ..." if len(holds) > 6 else "") if holds else "nothing"
        raise DatasetError(folder, f"{len(tracks)} track folders, but none has all of {', '.join(names)} "
                                   f"({tracks[0].name}/ holds {what})")
    for t in tracks:
        for n in names:
            if not (t / n).is_file():
                raise DatasetError(t / n, f"missing; every MUSDB18-HQ track folder holds {', '.join(names)}")


def folder_tracks(
    root: str | Path,
    layout: str,
    sources: list[str] | None = None,
    input_file: str = "mixture.wav",
    output_file: str = "vocals.wav",
    mixture_file: str = "mixture.wav",
    variable_sources: bool = False,
) -> list[TrackRef]:
    """Tracks of one of open-unmix's custom folder layouts (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "no such dataset folder")
    # names from flags become paths inside the root only as plain names
    for name in sources or ():
        fileio.check_name(name, "source", "--sources")
    for flag, name in (("--input-file", input_file), ("--output-file", output_file), ("--mixture-file", mixture_file)):
        fileio.check_name(name, "file name", flag)
    if layout == "aligned":
        refs = _aligned(root, input_file, output_file)
    elif layout == "sourcefolder":
        refs = _sourcefolder(root, sources)
    elif layout == "trackfolder":
        refs = _trackfolder(root, sources, mixture_file, variable_sources)
    else:
        raise UsageError(None, f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if not refs:
        raise DatasetError(root, f"no tracks found for layout {layout}")
    return refs


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES and not p.name.startswith("."))


def _aligned(root: Path, input_file: str, output_file: str) -> list[TrackRef]:
    target = Path(output_file).stem
    refs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        inputs, outputs = sorted(folder.glob(input_file)), sorted(folder.glob(output_file))
        if not inputs or not outputs:
            missing = input_file if not inputs else output_file
            raise DatasetError(folder, f"missing {missing} (aligned layout needs {input_file} and {output_file})")
        refs.append(TrackRef(name=folder.name, kind="aligned", files={"mixture": str(inputs[0]), target: str(outputs[0])}))
    return refs


def _sourcefolder(root: Path, sources: list[str] | None) -> list[TrackRef]:
    names = sources or sorted(p.name for p in root.iterdir() if p.is_dir())
    refs = []
    for source in names:
        folder = root / source
        if not folder.is_dir():
            raise DatasetError(folder, f"missing folder for source {source!r}")
        files = _audio_files(folder)
        if not files:
            raise DatasetError(folder, f"no audio files for source {source!r}")
        refs += [TrackRef(name=f"{source}/{f.stem}", kind="sourcefolder", files={source: str(f)}) for f in files]
    return refs


def _trackfolder(root: Path, sources: list[str] | None, mixture_file: str, variable: bool) -> list[TrackRef]:
    """Every track holds the same sources: ``sources`` or, by default, every source any track has.

    A track that lacks one is an error naming the missing file, unless ``variable`` (then it is
    silence): open-unmix's fixed-source training would otherwise train on a stem that is absent.
    """
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    found = [(folder, {p.stem: p for p in _audio_files(folder) if p.name != mixture_file}) for folder in folders]
    wanted = sources or sorted({s for _, present in found for s in present})
    suffix = {s: p.suffix for _, present in found for s, p in present.items()}  # names the missing file
    refs = []
    for folder, present in found:
        if not variable:
            missing = [s for s in wanted if s not in present]
            if missing:
                raise DatasetError(folder / f"{missing[0]}{suffix.get(missing[0], '.wav')}",
                                   "missing; every track of a trackfolder dataset needs the same sources "
                                   "(--sources to choose, --variable-sources to allow silence)")
        files = {s: str(present[s]) for s in wanted if s in present}
        if not files:
            raise DatasetError(folder, "no stems found" + (f" (looked for {', '.join(wanted)})" if wanted else ""))
        if (folder / mixture_file).exists():
            files["mixture"] = str(folder / mixture_file)
        refs.append(TrackRef(name=folder.name, kind="trackfolder", files=files))
    return refs


def module_tracks(spec: str, args: dict[str, Any]) -> tuple[list[TrackRef], list[str]]:
    """Tracks of a user's dataset class ``MODULE:CLASS`` (or ``path/to/file.py:CLASS``).

    The contract (the pattern of open-unmix's TemplateDataset), see ``examples/template_dataset.py``:
    ``CLASS(**args)`` has ``sample_rate`` (int), ``__len__`` and ``__getitem__(index)`` returning a
    mapping from source name to audio of shape ``(channels, samples)`` (numpy or torch), optionally
    with a ``"mixture"`` entry; an optional ``track_name(index)`` names the tracks and an optional
    ``sources`` list names the sources (else those of the first item).

    Returns the tracks and the source names.
    """
    dataset = instantiate_module(spec, args)
    try:
        count = len(dataset)
        names = [_module_track_name(dataset, i) for i in range(count)]
    except Exception as exc:  # user code
        raise DatasetError(spec, f"listing tracks failed: {type(exc).__name__}: {audio._first_line(exc)}") from exc
    if not names:
        raise DatasetError(spec, "the dataset has no items (len() is 0)")
    blob = json.dumps(args, sort_keys=True)
    refs = [TrackRef(name=n, kind="module", module_spec=spec, module_args=blob, index=i) for i, n in enumerate(names)]
    sources = getattr(dataset, "sources", None)
    if not sources:
        first = module_item(dataset, spec, 0)
        sources = [k for k in (first.keys() if hasattr(first, "keys") else []) if k != "mixture"]
    return refs, list(sources)


def _module_track_name(dataset, index: int) -> str:
    if hasattr(dataset, "track_name"):
        return str(dataset.track_name(index))
    return f"{type(dataset).__name__}-{index:05d}"


_MODULE_CACHE: dict[tuple[str, str], Any] = {}


def instantiate_module(spec: str, args: dict[str, Any]):
    """Import ``MODULE:CLASS`` and build it with ``args``; cached per process for decode workers.

    The user's code is a boundary: whatever it raises (a syntax error, a missing file in its
    constructor) becomes a :class:`DatasetError` naming the spec and the exception.
    """
    key = (spec, json.dumps(args, sort_keys=True))
    if key in _MODULE_CACHE:
        return _MODULE_CACHE[key]
    if ":" not in spec:
        raise UsageError(None, f"{spec!r} is not MODULE:CLASS")
    module_name, class_name = spec.rsplit(":", 1)
    module = _import_user_module(module_name)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise DatasetError(module_name, f"has no class {class_name!r}")
    try:
        dataset = cls(**args)
    except UmxError:
        raise
    except TypeError as exc:
        raise DatasetError(spec, f"cannot construct with {args} ({exc})") from exc
    except Exception as exc:  # user code: any failure is reported, not a traceback
        raise DatasetError(spec, f"constructor failed: {type(exc).__name__}: {audio._first_line(exc)}") from exc
    for needed in ("__len__", "__getitem__"):
        if not hasattr(dataset, needed):
            raise DatasetError(spec, f"the dataset class lacks {needed}")
    rate = getattr(dataset, "sample_rate", None)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate != int(rate) or rate <= 0:
        raise DatasetError(spec, f"the dataset class needs a positive integer sample_rate attribute, has {rate!r}")
    sources = getattr(dataset, "sources", None)
    if sources is not None and (isinstance(sources, str) or not all(isinstance(x, str) for x in sources)):
        raise DatasetError(spec, f"sources must be a list of names, got {sources!r}")
    _MODULE_CACHE[key] = dataset
    return dataset


def _import_user_module(module_name: str):
    try:
        if not module_name.endswith(".py"):
            return importlib.import_module(module_name)
        path = Path(module_name).resolve()
        if not path.exists():
            raise DatasetError(module_name, "no such file")
        # a private module name: a user file called musdb.py must not replace the real musdb
        unique = f"umxtools_user_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}_{path.stem}"
        if unique in sys.modules:
            return sys.modules[unique]
        loader_spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[unique] = module
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[unique]
            raise
        return module
    except UmxError:
        raise
    except ImportError as exc:
        raise DatasetError(module_name, f"cannot import ({exc})") from exc
    except Exception as exc:  # a syntax or runtime error in the user's module
        raise DatasetError(module_name, f"cannot import ({type(exc).__name__}: {audio._first_line(exc)})") from exc


def module_item(dataset, spec: str, index: int):
    """``dataset[index]``, with any failure of the user's code reported as a DatasetError."""
    try:
        return dataset[index]
    except UmxError:
        raise
    except Exception as exc:  # user code
        raise DatasetError(f"{spec}[{index}]", f"__getitem__ failed: {type(exc).__name__}: {audio._first_line(exc)}") from exc


# --- loading ---------------------------------------------------------------------------------


def load_track(ref: TrackRef, sample_rate: int, resample: bool = False) -> Track:
    """Decode one track; every stream is checked for rate, length, emptiness and finiteness."""
    if ref.kind == "module":
        return _load_module_track(ref, sample_rate, resample)
    if "stems" in ref.files:
        path = ref.files["stems"]
        stems, rate = audio.read_stems(path)
        if len(stems) < len(ref.stem_order):
            raise AudioError(path, f"has {len(stems)} streams, expected {len(ref.stem_order)} (mixture + sources)")
        streams = {role: audio.to_stereo(stems[i], path) for i, role in enumerate(ref.stem_order)}
        rates = {role: rate for role in streams}
        inputs = [path]
    else:
        streams, rates = {}, {}
        for role, path in ref.files.items():
            streams[role], rates[role] = audio.read(path)
        inputs = list(dict.fromkeys(ref.files.values()))
    for role, rate in rates.items():
        if rate != sample_rate:
            if not resample:
                raise AudioError(ref.files.get(role, ref.files.get("stems")), f"sample rate {rate} Hz, expected {sample_rate} Hz (pass --resample to convert)")
            streams[role] = audio.resample(streams[role], rate, sample_rate)
    _check_lengths(ref, streams)
    mixture = streams.pop("mixture", None)
    return Track(name=ref.name, sample_rate=sample_rate, sources=streams, mixture=mixture, inputs=inputs)


def _check_lengths(ref: TrackRef, streams: dict[str, np.ndarray]) -> None:
    lengths = {role: a.shape[-1] for role, a in streams.items()}
    if len(set(lengths.values())) > 1:
        where = ref.files.get("stems") or str(Path(next(iter(ref.files.values()))).parent)
        detail = ", ".join(f"{r} {n}" for r, n in lengths.items())
        raise DatasetError(where, f"track {ref.name!r}: stems have different lengths ({detail} samples)")


def _load_module_track(ref: TrackRef, sample_rate: int, resample: bool) -> Track:
    dataset = instantiate_module(ref.module_spec, json.loads(ref.module_args))
    where = f"{ref.module_spec}[{ref.index}]"
    item = module_item(dataset, ref.module_spec, ref.index)
    if not hasattr(item, "items"):
        raise DatasetError(where, f"__getitem__ must return a mapping of source name to audio, got {type(item).__name__}")
    rate = int(dataset.sample_rate)
    declared = getattr(dataset, "sources", None)
    streams = {}
    for role, value in item.items():
        if declared and role != "mixture" and role not in declared:
            raise DatasetError(where, f"returned source {role!r}, not in the class's sources {list(declared)}")
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        array = np.asarray(array, dtype=np.float32)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2:
            raise DatasetError(where, f"{role}: expected (channels, samples), got shape {array.shape}")
        if array.shape[-1] == 0:
            raise AudioError(where, f"{role}: no audio samples")
        if not np.isfinite(array).all():
            raise AudioError(where, f"{role}: contains NaN or infinite samples")
        array = audio.to_stereo(array, where)
        if rate != sample_rate:
            if not resample:
                raise AudioError(where, f"sample rate {rate} Hz, expected {sample_rate} Hz (pass --resample to convert)")
            array = audio.resample(array, rate, sample_rate)
        streams[role] = array
    _check_lengths(ref, streams)
    mixture = streams.pop("mixture", None)
    if not streams:
        raise DatasetError(where, "no sources returned")
    # provenance: the module's file (the data it reads is the class's business; see the docs)
    module_file = ref.module_spec.rsplit(":", 1)[0]
    if not module_file.endswith(".py"):
        module_file = getattr(sys.modules.get(module_file), "__file__", None) or module_file
    inputs = [module_file]
    return Track(name=ref.name, sample_rate=sample_rate, sources=streams, mixture=mixture, inputs=inputs)
