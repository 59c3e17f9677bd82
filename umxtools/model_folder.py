"""The model folder format (docs/model-format.md): its files' names and keys, written and read here.

A folder holds one or more *runs*. A single-target UMX run is named after its target and writes
open-unmix's files (``vocals.pth``, ``vocals.chkpnt``, ``vocals.json``); several of them (one per
target, trained one after another or side by side) make open-unmix's usual 4-target folder. A
joint, waveform or custom model is one run named ``model`` (``model.pth``, ``model.chkpnt``,
``model.json``); a joint model also exports every target as open-unmix files. Every run adds
``<run>.history.csv``; the folder has one ``separator.json`` and one ``curves.png``.

Every key of ``separator.json``, ``<target>.json``, ``model.json`` and ``<run>.chkpnt`` is written
and read in this module, as :mod:`umxtools.cache` does for caches. ``model.json`` and the
checkpoint carry ``format`` and ``format_version``: a version newer than this code's is refused
with a line saying to upgrade, and a missing or garbled key is one line naming the file and key.
open-unmix's files (``separator.json``, ``<target>.json``) have no format key: they are read as
open-unmix writes them. What a folder's files rebuild (torch modules) is
:mod:`umxtools.models.loading`'s; when a run resumes or is replaced, :mod:`umxtools.checkpoints`'.

Every file is written under a temporary name in the folder and renamed when complete
(:func:`umxtools.fileio.atomic`), so a killed process (even ``kill -9``) leaves either the
previous file or the new one, never half of one. The checkpoint is the source of truth for
resuming: the other files of a run are derived from it and can be rewritten from it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from umxtools import __version__, fileio
from umxtools.errors import CheckpointError, ModelError, OutputError

MODEL_FORMAT = "umxtools.model"
MODEL_FORMAT_VERSION = 1
CHECKPOINT_FORMAT = "umxtools.checkpoint"
CHECKPOINT_VERSION = 1
MODEL_RUN = "model"  # the run name of joint, waveform and custom models
MODEL_JSON = f"{MODEL_RUN}.json"
SEPARATOR_JSON = "separator.json"
# ema.<run>.pth, ema.<target>.pth: the EMA weights beside <run>.pth; a prefix, not a suffix, so that
# open-unmix's loader (it globs <target>*.pth) never picks them instead of the raw weights
EMA_PREFIX = "ema."
HISTORY_COLUMNS = ("epoch", "train_loss", "valid_loss", "valid_sdr", "best", "lr", "seconds", "samples", "samples_per_s", "data_wait")
# the flags a resumed run must share with its checkpoint (TrainConfig.args() names)
IDENTITY_FLAGS = ("targets", "nb_channels", "seq_dur", "valid_seq_dur", "samples_per_track", "source_augmentations",
                  "random_track_mix", "batch_size", "lr", "weight_decay", "lr_decay_patience", "lr_decay_gamma", "patience", "seed",
                  "optimizer", "lr_schedule", "warmup_steps", "clip_grad_norm", "accumulate", "ema", "valid_metric")
# the recipe every run had before its flags existed: a checkpoint without these keys was trained
# so, and resumes when this run asks for the same
IDENTITY_BEFORE_RECIPE = {"optimizer": "adam", "lr_schedule": "plateau", "warmup_steps": 0, "clip_grad_norm": 0.0, "accumulate": 1,
                          "ema": 0.0, "valid_metric": "loss"}


# --- names -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFiles:
    """Where one run's files go. ``name`` is the target (single UMX) or ``"model"``."""

    folder: Path
    name: str
    exports: tuple[str, ...] = ()  # targets exported as open-unmix files (joint models)

    @property
    def weights(self) -> Path:
        return self.folder / f"{self.name}.pth"

    @property
    def ema_weights(self) -> Path:
        """``ema.<run>.pth``: the weights' moving average (``--ema``), beside the raw weights."""
        return self.folder / f"{EMA_PREFIX}{self.name}.pth"

    @property
    def checkpoint(self) -> Path:
        return self.folder / f"{self.name}.chkpnt"

    @property
    def metadata(self) -> Path:
        """``<target>.json`` (open-unmix's) or ``model.json`` (umxtools')."""
        return self.folder / f"{self.name}.json"

    @property
    def history(self) -> Path:
        return self.folder / f"{self.name}.history.csv"

    @property
    def separator(self) -> Path:
        return self.folder / SEPARATOR_JSON

    @property
    def curves(self) -> Path:
        return self.folder / "curves.png"

    @property
    def targets(self) -> list[str]:
        """The targets whose weights this run writes (and lists in ``separator.json``)."""
        return list(self.exports) if self.name == MODEL_RUN else [self.name]

    def export_weights(self, target: str) -> Path:
        return self.folder / f"{target}.pth"

    def export_ema_weights(self, target: str) -> Path:
        return self.folder / f"{EMA_PREFIX}{target}.pth"

    def export_metadata(self, target: str) -> Path:
        return self.folder / f"{target}.json"

    def own(self) -> list[Path]:
        """Every file this run writes except the folder-wide ``separator.json`` and ``curves.png``."""
        paths = [self.weights, self.ema_weights, self.checkpoint, self.metadata, self.history]
        for t in self.exports:
            paths += [self.export_weights(t), self.export_ema_weights(t), self.export_metadata(t)]
        return paths


def run_files_in(folder: Path) -> list[Path]:
    """Files of any run: weights, checkpoints, metadata, histories (not separator.json or plots)."""
    if not folder.is_dir():
        return []
    found = [p for p in sorted(folder.iterdir())
             if not p.name.startswith(".") and (p.suffix in (".pth", ".chkpnt") or p.name.endswith(".history.csv"))]
    stems = {p.name.split(".")[0] for p in found}
    # metadata counts only beside a run's weights (a user's notes.json is not a run)
    found += [p for p in sorted(folder.glob("*.json")) if p.stem in stems or p.name == MODEL_JSON]
    return sorted(found)


def weights_path(folder: Path, target: str) -> Path | None:
    """``<target>.pth``, or a torch.hub-style ``<target>-<hash>.pth`` (open-unmix globs ``<target>*.pth``)."""
    exact = folder / f"{target}.pth"
    if exact.is_file():
        return exact
    hashed = sorted(folder.glob(f"{target}-*.pth"))
    return hashed[0] if hashed else None


# --- what a run records ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model: class spec, JSON constructor arguments and kind (model.json)."""

    cls: str
    args: dict
    kind: str  # "spectrogram" | "waveform"


@dataclass(frozen=True)
class RunInfo:
    """What every file of a training run records that no epoch changes."""

    files: RunFiles
    spec: ModelSpec
    flags: dict  # umxtools.training.TrainConfig.args(): every flag, as JSON
    command: list[str] | None
    sample_rate: int
    n_fft: int
    n_hop: int
    nb_channels: int
    loss: str
    cache: dict  # cache_identity() of the training cache
    valid_cache: dict | None  # of the validation cache; None: no validation
    segmenting: dict | None = None  # how separate runs the model (model.json's key); None: the class's rule

    @property
    def targets(self) -> list[str]:
        return list(self.flags["targets"])

    @property
    def validates(self) -> bool:
        return self.valid_cache is not None


@dataclass
class Progress:
    """Where a run stands: the checkpoint's bookkeeping, from which the histories derive."""

    epochs_trained: int = 0
    best_epoch: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)  # one row per epoch: HISTORY_COLUMNS, per-target losses


def cache_identity(meta) -> dict | None:
    """A cache's identity (a :class:`umxtools.cache.CacheMeta`'s) as model metadata records it;
    ``fingerprint`` survives moving the file. None for no cache (training without validation)."""
    if meta is None:
        return None
    dataset = json.loads(meta.attrs.get("dataset", "{}"))
    blob = {"tracks": [(t.name, t.nb_samples, list(t.roles)) for t in meta.tracks], "settings": meta.settings.as_dict(),
            "sources": list(meta.sources), "dataset": dataset, "dtype": meta.dtype}
    fingerprint = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]
    return {"path": str(meta.path.resolve()), "tracks": len(meta.tracks), "dataset": dataset, "fingerprint": fingerprint}


def run_identity(info: RunInfo) -> dict:
    """What a resumed run must share with the checkpoint (the flags that shape the losses).

    Not in it: ``epochs``, ``time_limit``, ``device``, ``amp``, ``nb_workers``, the number of
    processes, paths (a cache may move; its fingerprint may not change).
    """
    # model arguments one by one, so a mismatch names the argument ("model.hidden_size")
    model = {f"model.{k}": v for k, v in info.spec.args.items()}
    return {"class": info.spec.cls, **model, "kind": info.spec.kind, **{k: info.flags[k] for k in IDENTITY_FLAGS},
            "loss": info.loss, "cache": info.cache["fingerprint"],
            "valid": None if info.valid_cache is None else info.valid_cache["fingerprint"]}


# --- JSON files ----------------------------------------------------------------------------------


def write_json(path: Path, data: dict) -> None:
    fileio.write_json(path, data, indent=4, sort_keys=True)  # what open-unmix's train.py writes


def read_json(path: Path) -> dict:
    """A JSON object, or :class:`ModelError` in one line naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(path, f"not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelError(path, "not a JSON object")
    return data


def _summary(info: RunInfo, progress: Progress, num_bad_epochs: int, target: str | None = None) -> dict:
    """Loss histories as open-unmix's <target>.json names them (one target's when given)."""
    suffix = f"_{target}" if target is not None and len(info.targets) > 1 else ""
    rows = progress.history
    # without validation there are no valid losses (not a list of nulls): best_loss is null
    valid = [r[f"valid_loss{suffix}"] for r in rows if r[f"valid_loss{suffix}"] is not None]
    best_row = next((r for r in rows if r["epoch"] == progress.best_epoch), None)
    return {"epochs_trained": progress.epochs_trained, "best_epoch": progress.best_epoch,
            "best_loss": best_row[f"valid_loss{suffix}"] if best_row else None,
            "weights_kept": (f"best_valid_{info.flags.get('valid_metric') or 'loss'}" if info.validates else "last_epoch"),
            "train_loss_history": [r[f"train_loss{suffix}"] for r in rows], "valid_loss_history": valid,
            "train_time_history": [r["seconds"] for r in rows], "num_bad_epochs": num_bad_epochs}


def _provenance(info: RunInfo) -> dict:
    return {"umxtools_version": __version__, "command": info.command, "cache": info.cache, "valid_cache": info.valid_cache}


def target_json(info: RunInfo, progress: Progress, num_bad_epochs: int, target: str) -> dict:
    """open-unmix's ``<target>.json``: ``args`` with what ``load_target_models`` reads."""
    a = info.spec.args
    args = {**info.flags, "target": target, "nfft": info.n_fft, "nhop": info.n_hop,
            **{k: a[k] for k in ("nb_channels", "hidden_size", "nb_layers", "unidirectional", "max_bin")}}
    ema = info.files.export_ema_weights(target) if info.files.name == MODEL_RUN else info.files.ema_weights
    return {"args": args, "rate": float(info.sample_rate), **_summary(info, progress, num_bad_epochs, target), **_provenance(info),
            "ema_weights": ema.name if info.flags.get("ema") else None}


def model_json(spec: ModelSpec, targets: list[str], weights: str, sample_rate: int, nb_channels: int,
               command: list[str] | None, **more) -> dict:
    """docs/model-format.md's ``model.json``; ``more``: the optional keys (``n_fft``, ``n_hop``,
    ``training``, ``cache``, ``valid_cache``, ``ema_weights``, ``segmenting``, ``imported_from``)."""
    return {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "kind": spec.kind, "class": spec.cls,
            "args": spec.args, "targets": list(targets), "weights": weights, "sample_rate": sample_rate,
            "nb_channels": nb_channels, "umxtools_version": __version__, "command": command, **more}


def trained_model_json(info: RunInfo, progress: Progress, num_bad_epochs: int) -> dict:
    """``model.json`` of a training run: the model, the flags, loss and histories, the caches."""
    training = {"args": info.flags, "loss": info.loss, **_summary(info, progress, num_bad_epochs)}
    return model_json(info.spec, info.targets, info.files.weights.name, info.sample_rate, info.nb_channels, info.command,
                      n_fft=info.n_fft, n_hop=info.n_hop, training=training, cache=info.cache, valid_cache=info.valid_cache,
                      ema_weights=info.files.ema_weights.name if info.flags.get("ema") else None, segmenting=info.segmenting)


@dataclass(frozen=True)
class ModelMeta:
    """A ``model.json`` as read and checked: everything needed to rebuild the model."""

    path: Path
    spec: ModelSpec
    targets: list[str]
    weights: Path  # within the folder
    sample_rate: int
    nb_channels: int
    n_fft: int | None
    n_hop: int | None
    segmenting: dict | None


def read_model_json(folder: Path) -> ModelMeta:
    """``folder/model.json``, checked: format, version, kind, targets, rates, STFT, weights name.

    A file without ``format_version`` (written by hand, as docs/models.md shows) is version 1.
    """
    from umxtools.models import KINDS  # torch-free registry; it imports umxtools.losses

    path = folder / MODEL_JSON
    meta = read_json(path)
    if meta.get("format") != MODEL_FORMAT:
        raise ModelError(path, f"not a umxtools model file (format {meta.get('format')!r}, expected {MODEL_FORMAT!r})")
    check_version(path, "model", meta.get("format_version", 1), MODEL_FORMAT_VERSION)
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ModelError(path, f"kind must be one of {', '.join(KINDS)}, has {kind!r}")
    targets = meta.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ModelError(path, "needs a non-empty 'targets' list")
    for t in targets:
        fileio.check_name(t, "target", path)
    rate = meta.get("sample_rate")
    if not isinstance(rate, (int, float)) or rate <= 0 or rate != int(rate):
        raise ModelError(path, f"needs a positive whole 'sample_rate', has {rate!r}")
    if kind == "spectrogram":
        for key in ("n_fft", "n_hop"):
            if not isinstance(meta.get(key), int) or meta[key] <= 0:
                raise ModelError(path, f"a spectrogram model needs a positive integer {key!r}")
    args = meta.get("args", {})
    if not isinstance(args, dict):
        raise ModelError(path, "'args' must be a JSON object of constructor arguments")
    weights = fileio.safe_child(folder, str(meta.get("weights", "model.pth")), "weights file", path)
    return ModelMeta(path, ModelSpec(str(meta.get("class", "")), args, kind), list(targets), weights, int(rate),
                     int(meta.get("nb_channels", 2)), meta.get("n_fft"), meta.get("n_hop"), meta.get("segmenting"))


def check_version(path: Path, what: str, version, known: int) -> None:
    """Refuse a ``format_version`` this code cannot read: newer than ``known``, or not a version."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelError(path, f"'format_version' must be a positive integer, has {version!r}")
    if version > known:
        raise ModelError(path, f"{what} format version {version} is newer than this umxtools reads ({known}); upgrade umxtools")


# --- separator.json and <target>.json (open-unmix's) ------------------------------------------


def separator_conf(sample_rate: int, n_fft: int, n_hop: int, nb_channels: int) -> dict:
    """open-unmix's separator.json fields (``load_separator`` reads sample_rate, nfft, nhop, nb_channels)."""
    return {"rate": float(sample_rate), "sample_rate": float(sample_rate), "nfft": n_fft, "nhop": n_hop, "nb_channels": nb_channels}


def _listed_targets(files: RunFiles) -> list[str]:
    """The targets ``separator.json`` lists that still have weights (none when it is unreadable)."""
    try:
        listed = json.loads(files.separator.read_text()).get("targets", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [t for t in listed if isinstance(t, str) and (files.folder / f"{t}.pth").exists()]


def write_separator(files: RunFiles, conf: dict) -> None:
    """``separator.json`` listing every target with weights in the folder (this run's first if new)."""
    targets = _listed_targets(files)
    write_json(files.separator, {"targets": targets + [t for t in files.targets if t not in targets], **conf})


def check_separator(files: RunFiles, conf: dict) -> None:
    """Models sharing a folder share one separator: refuse other STFT settings than the folder's."""
    path = files.separator
    if not path.exists():
        return
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OutputError(path, f"unreadable ({exc}); delete it or use another folder") from exc
    others = [t for t in have.get("targets", []) if t not in files.targets and (files.folder / f"{t}.pth").exists()]
    if not others:
        return
    for key in ("nfft", "nhop", "sample_rate", "nb_channels"):
        if key in have and float(have[key]) != float(conf[key]):
            raise OutputError(path, f"the folder's models ({', '.join(others)}) use {key}={have[key]}, this run {conf[key]}; "
                                    "use another folder")


@dataclass(frozen=True)
class SeparatorMeta:
    """An open-unmix folder's ``separator.json`` as read and checked."""

    path: Path
    targets: list[str]  # listed, or (open-unmix's own files list none) every <target>.json with weights
    sample_rate: int
    nfft: int
    nhop: int
    nb_channels: int


def read_separator(folder: Path) -> SeparatorMeta:
    """``folder/separator.json``, checked: STFT, channels, rate and plain target names."""
    path = folder / SEPARATOR_JSON
    conf = read_json(path)
    for key in ("nfft", "nhop", "nb_channels"):
        if not isinstance(conf.get(key), int) or conf[key] <= 0:
            raise ModelError(path, f"needs a positive integer {key!r}")
    rate = conf.get("sample_rate", conf.get("rate"))
    if not isinstance(rate, (int, float)) or rate <= 0 or rate != int(rate):
        raise ModelError(path, f"needs a positive whole 'sample_rate', has {rate!r}")
    targets = conf.get("targets")
    if isinstance(targets, list) and targets:
        where = path
    else:
        where = folder
        targets = sorted(p.stem for p in folder.glob("*.json")
                         if p.name not in (SEPARATOR_JSON, MODEL_JSON) and weights_path(folder, p.stem) is not None)
    for t in targets:  # each names files (<target>.pth, <target>.json): a plain name from here on
        fileio.check_name(t, "target", where)
    return SeparatorMeta(path, list(targets), int(rate), conf["nfft"], conf["nhop"], conf["nb_channels"])


def target_nfft(folder: Path, target: str) -> int | None:
    """The STFT size ``<target>.json`` says the model was trained with (None: no such file or key)."""
    path = folder / f"{target}.json"
    if not path.exists():
        return None
    args = read_json(path).get("args", {})
    return args.get("nfft") if isinstance(args, dict) else None


# --- the checkpoint ----------------------------------------------------------------------------


def checkpoint(info: RunInfo, progress: Progress, *, state_dict: dict, optimizer: dict, scheduler: dict, scaler: dict,
               early_stopping: dict, world_size: int, rng: dict, optimizer_steps: int, ema: dict) -> dict:
    """The ``<run>.chkpnt`` payload (docs/model-format.md), in types ``weights_only`` loading accepts."""
    return {
        "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "umxtools_version": __version__,
        # open-unmix's keys (its train.py --checkpoint reads epoch, state_dict, optimizer, scheduler)
        "epoch": progress.epochs_trained + 1, "state_dict": state_dict, "best_loss": early_stopping["best"],
        "optimizer": optimizer, "scheduler": scheduler,
        "epochs_trained": progress.epochs_trained, "best_epoch": progress.best_epoch, "early_stopping": early_stopping,
        "stopped_early": progress.stopped_early, "scaler": scaler, "history": progress.history,
        "identity": run_identity(info), "targets": info.targets,
        "model": {"class": info.spec.cls, "args": info.spec.args, "kind": info.spec.kind},
        "world_size": world_size, "rng": rng, "optimizer_steps": optimizer_steps, "ema": ema,
    }


def load_checkpoint(path: Path) -> dict:
    """A umxtools checkpoint, loaded with ``weights_only=True`` (no code runs from the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(path, f"refused by weights-only loading (it holds more than tensors and plain values: {first})") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(path, "unreadable checkpoint (truncated or not a torch file); delete it or pass --force") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(path, "not a umxtools checkpoint (no 'format' key); pass --force to start over")
    try:
        check_version(path, "checkpoint", state.get("format_version"), CHECKPOINT_VERSION)
    except ModelError as exc:
        raise CheckpointError(path, exc.problem) from exc
    return state


@dataclass(frozen=True)
class Resumed:
    """A checkpoint's content, by key, for a run to continue from."""

    path: Path
    progress: Progress
    identity: dict
    state_dict: dict
    optimizer: dict
    scheduler: dict
    scaler: dict
    early_stopping: dict
    rng: dict
    optimizer_steps: int  # optimiser steps taken (the warm-up and cosine schedules' position)
    ema: dict  # the weights' moving average (--ema); {} without


def resumed(path: Path, state: dict) -> Resumed:
    """The entries of a loaded checkpoint (:func:`load_checkpoint`); a missing or garbled one is
    :class:`CheckpointError`, one line naming the key."""
    keys = ("identity", "state_dict", "optimizer", "scheduler", "early_stopping", "rng", "history")
    for key in keys:
        if not isinstance(state.get(key), (dict, list) if key == "history" else dict):
            raise CheckpointError(path, f"its {key!r} entry is missing or garbled; pass --force to start over")
    try:
        progress = Progress(int(state["epochs_trained"]), int(state["best_epoch"]), bool(state["stopped_early"]),
                            list(state["history"]))
    except (KeyError, TypeError, ValueError) as exc:
        key = exc.args[0] if isinstance(exc, KeyError) else "epochs_trained, best_epoch or stopped_early"
        raise CheckpointError(path, f"its {key!r} entry is missing or garbled; pass --force to start over") from exc
    return Resumed(path, progress, state["identity"], state["state_dict"], state["optimizer"], state["scheduler"],
                   state.get("scaler") or {}, state["early_stopping"], state["rng"], int(state.get("optimizer_steps", 0)),
                   state.get("ema") or {})


# --- a run's files, written in order -------------------------------------------------------------


def save_torch(path: Path, obj) -> None:
    with fileio.atomic(path) as tmp:
        torch.save(obj, tmp)


def write_weights(files: RunFiles, state_dict: dict, exports: dict[str, dict], ema: dict | None = None,
                  ema_exports: dict[str, dict] | None = None) -> None:
    """``<run>.pth``, and each exported target's ``<target>.pth`` (joint models); with ``--ema``
    the moving averages beside them (``ema.<run>.pth``, ``ema.<target>.pth``)."""
    save_torch(files.weights, state_dict)
    for t, part in exports.items():
        save_torch(files.export_weights(t), part)
    if ema:
        save_torch(files.ema_weights, ema)
        for t, part in (ema_exports or {}).items():
            save_torch(files.export_ema_weights(t), part)


def write_metadata(info: RunInfo, progress: Progress, num_bad_epochs: int) -> None:
    """What derives from the checkpoint: ``<target>.json`` or ``model.json`` (and the exports'
    ``<target>.json``), the history and ``separator.json``. Written after the checkpoint."""
    files = info.files
    if files.name == MODEL_RUN:
        write_json(files.metadata, trained_model_json(info, progress, num_bad_epochs))
        for t in files.exports:
            write_json(files.export_metadata(t), target_json(info, progress, num_bad_epochs, t))
    else:
        write_json(files.metadata, target_json(info, progress, num_bad_epochs, files.name))
    write_history(files.history, progress.history)
    write_separator(files, separator_conf(info.sample_rate, info.n_fft, info.n_hop, info.nb_channels))


def metadata_current(files: RunFiles, epochs_trained: int) -> bool:
    """Whether the files derived from the checkpoint (metadata, history, weights, exports,
    separator.json) are those of its epoch: a kill between the checkpoint and them leaves them
    an epoch behind."""
    try:
        meta = json.loads(files.metadata.read_text())
        listed = json.loads(files.separator.read_text()).get("targets", [])
        recorded = meta.get("training", meta).get("epochs_trained")
    except (OSError, ValueError, AttributeError):
        return False
    exports = [p for t in files.exports for p in (files.export_weights(t), files.export_metadata(t))]
    return (recorded == epochs_trained and files.history.exists() and files.weights.exists()
            and all(p.exists() for p in exports) and all(t in listed for t in files.targets))


def write_history(path: Path, history: list[dict]) -> None:
    """One row per epoch; per-target losses (``train_loss_<target>``, ...) after the fixed columns."""
    extra = sorted({k for row in history for k in row} - set(HISTORY_COLUMNS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*HISTORY_COLUMNS, *extra], lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (int(v) if isinstance(v, bool) else v) for k, v in row.items()})
    fileio.write_text(path, buf.getvalue())


def read_history(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: (int(v) if k in ("epoch", "samples") else float(v)) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
