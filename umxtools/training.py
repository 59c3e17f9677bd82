"""Training separation models from caches: open-unmix's training loop, for every model kind.

:func:`train` follows ``openunmix/scripts/train.py``: random excerpts of the training cache
(:class:`umxtools.loaders.RandomDataset`, open-unmix's sampler), Adam with weight decay,
``ReduceLROnPlateau`` on the validation loss (factor ``lr_decay_gamma``, patience
``lr_decay_patience``, cooldown 10), open-unmix's early stopping, validation on whole tracks of the
validation cache each epoch, and the best weights kept by validation loss. Without a validation
cache (``valid=None``) there is no validation: the weights kept are the last epoch's, the
scheduler watches the training loss and there is no early stopping (docs/train.md, "Training
without validation"). The model is one of:

- ``umx`` (one target): open-unmix's ``OpenUnmix``, input normalisation from the cache's
  mixture statistics, loss = MSE between estimated and true target magnitudes;
- ``umx`` with ``joint``: :class:`umxtools.models.OpenUnmixJoint`, one UMX per target, loss =
  the sum over targets of the per-target MSE (open-unmix's "Jointly train targets" guide);
- ``waveform``: :class:`umxtools.models.Demucs` (Demucs v2), trained on waveforms with an L1
  or SDR loss summed over targets;
- ``MODULE:CLASS``: a user's model following examples/template_model.py, spectrogram (MSE on
  magnitudes) or waveform (L1/SDR) according to its ``kind`` attribute.

Everything is checked before anything is written (caches, targets, STFT settings, the model, the
output folder, the checkpoint to resume), so bad input leaves no files. Rank 0 then holds an
exclusive lock on the run (``OUT/.<run>.chkpnt.lock``, :func:`umxtools.fileio.exclusive`) while it
decides whether to resume or replace and for the whole training: a second ``train`` of the same
run into the same folder fails at once, naming the holder. Under ``torchrun`` the
same function runs in every process (DistributedDataParallel; each rank draws its own share of
the random excerpts; rank 0 alone writes). The files are described in docs/model-format.md and
docs/train.md.

Shapes: spectrogram models take ``x`` ``(batch, channels, bins, frames)`` and return
``(batch, targets, channels, bins, frames)``; waveform models take ``(batch, channels, samples)``
and return ``(batch, targets, channels, samples)``. Targets ``y`` always have the targets axis.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from umxtools import __version__, distributed, fileio
from umxtools.batching import CacheLoader
from umxtools.cache import MIXTURE, CacheMeta, open_cache
from umxtools.checkpoints import (
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    MODEL_RUN,
    CheckpointError,
    RunFiles,
    check_identity,
    check_separator,
    load_checkpoint,
    plan_output,
    remove_stale_tmp,
    rng_state,
    save_torch,
    separator_conf,
    set_rng_state,
    write_curves,
    write_history,
    write_json,
    write_separator,
)
from umxtools.errors import CacheError, OutputError, TrainingError, UmxError, UsageError
from umxtools.loaders import IndexDataset, RandomDataset
from umxtools.losses import LOSS_FUNCTIONS, LOSSES, EarlyStopping
from umxtools.models import JOINT, MODELS, ModelError, OpenUnmix, OpenUnmixJoint, load_class, spec_of
from umxtools.transforms import bandwidth_to_max_bin

AUGMENTATIONS = ("gain", "channelswap")
WAVEFORM_LOSSES = LOSSES["waveform"]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
STATS_ARGS = ("input_mean", "input_scale")
CURVES_EVERY_S = 30.0

Reporter = Callable[[str, dict], None]


@dataclass
class TrainConfig:
    """Every flag of ``umxtools train``; defaults are open-unmix's (``scripts/train.py``)."""

    cache: Path
    valid: Path | None  # None: no validation (the last epoch's weights are kept)
    output: Path
    targets: tuple[str, ...] = ("vocals",)
    joint: bool = False
    model: str = "umx"  # a MODELS name or MODULE:CLASS
    model_args: dict = field(default_factory=dict)
    nfft: int | None = None  # None: the cache's
    nhop: int | None = None
    nb_channels: int = 2
    hidden_size: int = 512
    nb_layers: int = 3
    bandwidth: float = 16000.0
    unidirectional: bool = False
    seq_dur: float = 6.0
    valid_seq_dur: float | None = None  # None: whole tracks, as open-unmix validates
    samples_per_track: int = 64
    source_augmentations: tuple[str, ...] = AUGMENTATIONS
    random_track_mix: bool = True
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    lr_decay_patience: int = 80
    lr_decay_gamma: float = 0.3
    patience: int = 140
    epochs: int = 1000
    seed: int = 42
    loss: str = "l1"  # waveform models only
    nb_workers: int = 0
    device: str = "auto"
    amp: str | None = None
    time_limit: float | None = None  # minutes; stop after the epoch that passes it
    force: bool = False
    resume: bool = False
    allow_stale: bool = False
    command: list[str] | None = None

    def args(self) -> dict:
        """The flags as JSON (recorded in ``<target>.json`` / ``model.json``)."""
        d = asdict(self)
        for k in ("cache", "valid", "output"):
            d[k] = None if d[k] is None else str(d[k])
        d["targets"], d["source_augmentations"] = list(self.targets), list(self.source_augmentations)
        d.pop("command")
        return d


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model: class spec and JSON constructor arguments (model.json)."""

    cls: str
    args: dict
    kind: str  # "spectrogram" | "waveform"


@dataclass
class _Plan:
    """Everything :func:`train` checked before writing anything."""

    config: TrainConfig
    meta: CacheMeta
    valid_meta: CacheMeta | None  # None: no validation
    model: torch.nn.Module
    spec: ModelSpec
    files: RunFiles
    identity: dict
    resume: dict | None  # the checkpoint to continue
    delete: list[Path]  # an earlier run's files (--force)


# --- public ------------------------------------------------------------------------------------


def train(config: TrainConfig, report: Reporter | None = None) -> Path:
    """Train as ``config`` says; the output folder. ``report(event, info)`` receives progress
    (events ``start``, ``batch``, ``epoch``, ``stop``) and messages a user must see even without
    progress (``note``: ``{"message": "PATH: ..."}``: no validation, tracks too short to be
    sampled, a resumed run with nothing to do) in the main process only.

    Raises :class:`umxtools.errors.UmxError` subclasses for bad input (before writing anything),
    :class:`UsageError` for ``--resume`` with fewer ``epochs`` than the checkpoint holds (nothing
    written), :class:`TrainingError` for a NaN loss and :class:`CacheError` for a validation
    cache whose data is damaged (the last good checkpoint is kept).
    """
    ctx = distributed.from_env()
    device = pick_device(config.device, ctx)
    if config.amp is not None and device.type != "cuda":
        raise UsageError(None, f"--amp {config.amp} needs a CUDA device (training on {device.type} runs in float32)")
    plan = prepare(config)
    with _holding(plan.files, ctx):
        plan_output_of(plan)
        distributed.setup(ctx, device)
        try:
            _Trainer(plan, ctx, device, report if ctx.main else None).fit()
        finally:
            distributed.teardown(ctx)
    return config.output


@contextlib.contextmanager
def _holding(files: RunFiles, ctx: distributed.Context):
    """Rank 0: the output folder checked writable and the run's lock held for the block.

    A folder this call created is removed again if it is still empty at the end (bad input found
    under the lock, a NaN loss in the first epoch): a failed run leaves no files.
    """
    if not ctx.main:
        yield
        return
    folder = files.folder
    created = not folder.exists()
    try:
        fileio.check_writable(folder)
        with fileio.exclusive(files.checkpoint):
            yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty


def pick_device(name: str, ctx: distributed.Context | None = None) -> torch.device:
    """``auto``: CUDA when available. Under torchrun each process takes GPU ``LOCAL_RANK``."""
    if name not in DEVICES:
        raise UsageError(None, f"unknown device {name!r}; one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise UsageError(None, "--device cuda: no CUDA device is available")
    if name == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", (ctx or distributed.Context()).local_rank)


def prepare(config: TrainConfig) -> _Plan:
    """Check the caches, targets, settings and model; build the model. Reads no output file:
    :func:`plan_output_of` decides, under the run's lock, what the output folder's files mean."""
    _check_flags(config)
    for path in (config.cache, config.valid):
        if path is not None and Path(config.output).resolve() == Path(path).resolve():
            raise OutputError(config.output, f"is the cache {path}; write the model folder somewhere else (-o)")
    if Path(config.output).exists() and not Path(config.output).is_dir():
        raise OutputError(config.output, "exists and is not a folder")
    meta = open_cache(config.cache, check_stale=not config.allow_stale)
    s = meta.settings
    for flag, key, want in (("--nfft", "n_fft", config.nfft), ("--nhop", "n_hop", config.nhop)):
        if want is not None and getattr(s, key) != want:
            raise CacheError(meta.path, f"cache was built with {key}={getattr(s, key)}, but {flag} {want} was given; "
                                        f"rebuild the cache with {flag} {want} or drop the flag")
    if not any(MIXTURE in t.roles for t in meta.tracks):
        raise UsageError(meta.path, "has no mixture statistics (a source-folder cache); the model's input normalisation needs them")
    valid_meta = None if config.valid is None else open_cache(config.valid, expect=s, check_stale=not config.allow_stale)
    torch.manual_seed(config.seed)  # the initial weights; the same on every rank
    model, spec = build_model(config, meta)
    # the datasets are built here too, so a missing target fails before anything is written
    _datasets(config, spec.kind, meta, valid_meta)
    files = _run_files(config, spec)
    if config.model == "umx" and (config.nb_layers != 3 or config.unidirectional):
        # openunmix.utils.load_target_models rebuilds OpenUnmix from hidden_size alone and loads
        # with strict=False: other LSTM layouts fail or, with fewer layers, silently keep random ones
        warnings.warn(f"{files.folder}: open-unmix's load_separator rebuilds only 3-layer bidirectional UMX models; "
                      "this one loads in umxtools only", stacklevel=2)
    identity = run_identity(config, spec, meta, valid_meta)
    return _Plan(config, meta, valid_meta, model, spec, files, identity, None, [])


def plan_output_of(plan: _Plan) -> None:
    """Whether to resume (the checkpoint, checked against the flags) and which files of an earlier
    run ``--force`` replaces; refuses a folder holding another run. Nothing is written here."""
    config, files, s = plan.config, plan.files, plan.meta.settings
    resume, plan.delete = plan_output(files, config.force, config.resume)
    check_separator(files, separator_conf(s.sample_rate, s.n_fft, s.n_hop, config.nb_channels))
    if resume:
        plan.resume = load_checkpoint(files.checkpoint)
        check_identity(files.checkpoint, plan.resume.get("identity", {}), plan.identity)
        trained = plan.resume.get("epochs_trained")
        if isinstance(trained, int) and config.epochs < trained:
            # a typo, or a Makefile's EPOCHS lowered: training less than the checkpoint holds is
            # impossible, and silently keeping the longer run would hide that
            raise UsageError(files.checkpoint, f"already trained {trained} epochs; --epochs {config.epochs} is fewer, so nothing was "
                                               f"done (raise --epochs above {trained} to continue, or --force to start over)")


def build_model(config: TrainConfig, meta: CacheMeta) -> tuple[torch.nn.Module, ModelSpec]:
    """The model the flags describe, its input normalisation from the cache's mixture statistics."""
    s = meta.settings
    mean, std = meta.statistics(MIXTURE)
    offered = {"targets": list(config.targets), "nb_bins": s.nb_bins, "nb_channels": config.nb_channels,
               "sample_rate": s.sample_rate, "n_fft": s.n_fft, "n_hop": s.n_hop,
               "max_bin": bandwidth_to_max_bin(s.sample_rate, s.n_fft, config.bandwidth)}
    if config.model == "umx":
        args = {k: offered[k] for k in ("nb_bins", "nb_channels", "max_bin")}
        args.update(hidden_size=config.hidden_size, nb_layers=config.nb_layers, unidirectional=config.unidirectional)
        if config.joint:
            cls, spec, args = OpenUnmixJoint, JOINT, {"targets": list(config.targets), **args}
        else:
            cls, spec = OpenUnmix, MODELS["umx"]
        model = cls(**args, input_mean=mean, input_scale=std)
        return model, ModelSpec(spec, args, "spectrogram")
    fixed = [k for k in config.model_args if k in offered and k != "max_bin"]
    if fixed:  # facts of the data and the flags, not choices of the model
        raise UsageError(None, f"--model-arg {fixed[0]}: umxtools sets it from the cache and the flags")
    spec = spec_of(MODELS.get(config.model, config.model))
    cls = load_class(spec)
    params = inspect.signature(cls).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    args = {k: v for k, v in offered.items() if k in params or var_kw}
    args.update(config.model_args)
    stats = {k: v for k, v in zip(STATS_ARGS, (mean, std)) if k in params}
    try:
        model = cls(**args, **stats)
    except UmxError:
        raise
    except TypeError as exc:
        raise ModelError(spec, f"cannot construct with {json.dumps(args, sort_keys=True)} ({exc})") from exc
    except Exception as exc:  # user code: any failure is one line, not a traceback
        raise ModelError(spec, f"constructor failed: {type(exc).__name__}: {str(exc).strip()[:200]}") from exc
    if not isinstance(model, torch.nn.Module):
        raise ModelError(spec, "the class is not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(spec, "the model has no trainable parameters")
    return model, ModelSpec(spec, args, cls.kind)


def cache_identity(meta: CacheMeta | None) -> dict | None:
    """A cache's identity as recorded in model metadata; ``fingerprint`` survives moving the file.
    None for no cache (training without validation)."""
    if meta is None:
        return None
    dataset = json.loads(meta.attrs.get("dataset", "{}"))
    blob = {"tracks": [(t.name, t.nb_samples, list(t.roles)) for t in meta.tracks], "settings": meta.settings.as_dict(),
            "sources": list(meta.sources), "dataset": dataset, "dtype": meta.dtype}
    fingerprint = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]
    return {"path": str(meta.path.resolve()), "tracks": len(meta.tracks), "dataset": dataset, "fingerprint": fingerprint}


def run_identity(config: TrainConfig, spec: ModelSpec, meta: CacheMeta, valid_meta: CacheMeta | None) -> dict:
    """What a resumed run must share with the checkpoint (the flags that shape the losses).

    Not in it: ``epochs``, ``time_limit``, ``device``, ``amp``, ``nb_workers``, the number of
    processes, paths (a cache may move; its fingerprint may not change).
    """
    c = config
    # model arguments one by one, so a mismatch names the argument ("model.hidden_size")
    model = {f"model.{k}": v for k, v in spec.args.items()}
    return {"class": spec.cls, **model, "kind": spec.kind, "targets": list(c.targets), "nb_channels": c.nb_channels,
            "seq_dur": c.seq_dur, "valid_seq_dur": c.valid_seq_dur, "samples_per_track": c.samples_per_track,
            "source_augmentations": list(c.source_augmentations), "random_track_mix": c.random_track_mix,
            "batch_size": c.batch_size, "lr": c.lr, "weight_decay": c.weight_decay, "lr_decay_patience": c.lr_decay_patience,
            "lr_decay_gamma": c.lr_decay_gamma, "patience": c.patience, "seed": c.seed,
            "loss": "mse" if spec.kind == "spectrogram" else c.loss,
            "cache": cache_identity(meta)["fingerprint"],
            "valid": None if valid_meta is None else cache_identity(valid_meta)["fingerprint"]}


# --- checks and data ---------------------------------------------------------------------------


def _check_flags(c: TrainConfig) -> None:
    if not c.targets:
        raise UsageError(None, "no target given")
    for t in c.targets:  # a target names the run's files (<target>.pth)
        fileio.check_name(t, "target", "--targets" if len(c.targets) > 1 else "--target")
    if len(set(c.targets)) != len(c.targets):
        raise UsageError(None, f"a target is named twice: {', '.join(c.targets)}")
    if c.model == "umx" and len(c.targets) > 1 and not c.joint:
        raise UsageError(None, "several targets with --model umx need --joint (or one command per target)")
    if c.model == "umx" and c.model_args:
        raise UsageError(None, "--model-arg is for --model waveform or MODULE:CLASS; UMX has its own flags")
    if c.model not in MODELS and ":" not in c.model:
        raise UsageError(None, f"unknown model {c.model!r}; one of {', '.join(MODELS)} or MODULE:CLASS")
    if c.nb_channels not in (1, 2):
        raise UsageError(None, f"--nb-channels {c.nb_channels}: caches are stereo, so 1 (downmix) or 2")
    unknown = [a for a in c.source_augmentations if a not in AUGMENTATIONS]
    if unknown:
        raise UsageError(None, f"unknown augmentation {unknown[0]!r}; known: {', '.join(AUGMENTATIONS)}")
    if c.loss not in WAVEFORM_LOSSES:
        raise UsageError(None, f"unknown loss {c.loss!r}; one of {', '.join(WAVEFORM_LOSSES)}")
    if c.amp is not None and c.amp not in AMP_DTYPES:
        raise UsageError(None, f"unknown --amp {c.amp!r}; one of {', '.join(AMP_DTYPES)}")
    if c.force and c.resume:
        raise UsageError(None, "--force and --resume exclude each other")
    for name in ("epochs", "batch_size", "samples_per_track"):
        if getattr(c, name) < 1:
            raise UsageError(None, f"--{name.replace('_', '-')} must be at least 1")


def _datasets(c: TrainConfig, kind: str, meta: CacheMeta, valid_meta: CacheMeta | None) -> tuple[RandomDataset, IndexDataset | None]:
    """Training (random excerpts) and validation (consecutive excerpts or whole tracks; None
    without a validation cache) datasets.

    ``joint=True`` always, so ``y`` has a targets axis whatever the number of targets.
    """
    output = "magnitude" if kind == "spectrogram" else "waveform"
    gain = (0.25, 1.25) if "gain" in c.source_augmentations else None
    _check_lengths(meta, meta.tracks, c.seq_dur, kind, "--seq-dur")
    train_ds = RandomDataset(meta, list(c.targets), seq_dur=c.seq_dur, samples_per_track=c.samples_per_track,
                             random_track_mix=c.random_track_mix, gain=gain, channel_swap="channelswap" in c.source_augmentations,
                             seed=c.seed, output=output, joint=True)
    if valid_meta is None:
        return train_ds, None
    mixed = [t for t in valid_meta.tracks if MIXTURE in t.roles]
    if not mixed:
        raise UsageError(valid_meta.path, "no track with a mixture to validate on (a source-folder cache); build the validation cache "
                                          "from track folders")
    if c.valid_seq_dur is not None:
        _check_lengths(valid_meta, mixed, c.valid_seq_dur, kind, "--valid-seq-dur")
    valid_ds = IndexDataset(valid_meta, list(c.targets), seq_dur=c.valid_seq_dur, output=output, joint=True)
    return train_ds, valid_ds


def _excerpt_fits(meta: CacheMeta, track, seq_dur: float, kind: str) -> bool:
    """Whether ``track`` holds one excerpt of ``seq_dur`` seconds, as the loaders count it
    (whole STFT frames; waveform models also whole samples)."""
    s = meta.settings
    samples = int(seq_dur * s.sample_rate)
    return track.nb_frames >= s.nb_frames(samples) and (kind == "spectrogram" or track.nb_samples >= samples)


def _check_lengths(meta: CacheMeta, tracks, seq_dur: float, kind: str, flag: str) -> None:
    """Refuse excerpts longer than every track, naming the flag, the longest track and its length."""
    if not tracks:
        return  # the datasets say what is missing
    longest = max(tracks, key=lambda t: t.nb_samples)
    if not _excerpt_fits(meta, longest, seq_dur, kind):
        seconds = longest.nb_samples / meta.settings.sample_rate
        raise UsageError(meta.path, f"every track is shorter than {flag} {seq_dur:g} s (the longest, {longest.name!r}, is "
                                    f"{seconds:.2f} s); lower {flag}")


def _short_tracks(meta: CacheMeta, seq_dur: float, kind: str) -> list:
    """The tracks the training sampler never draws (shorter than one excerpt)."""
    return [t for t in meta.tracks if not _excerpt_fits(meta, t, seq_dur, kind)]


def _run_files(c: TrainConfig, spec: ModelSpec) -> RunFiles:
    if c.model == "umx" and not c.joint:
        return RunFiles(Path(c.output), c.targets[0])
    return RunFiles(Path(c.output), MODEL_RUN, exports=tuple(c.targets) if c.joint else ())


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """torch's seed for one epoch of one rank: dropout masks differ between ranks, and a resumed
    run draws what an uninterrupted one would."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


# --- the loop ------------------------------------------------------------------------------------


class _Trainer:
    def __init__(self, plan: _Plan, ctx: distributed.Context, device: torch.device, report: Reporter | None):
        self.plan, self.config, self.ctx, self.device, self.report = plan, plan.config, ctx, device, report
        c = self.config
        self.files, self.spec = plan.files, plan.spec
        self.targets = list(c.targets)
        self.model = plan.model.to(device)
        self.net = self.model
        if ctx.distributed:
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=c.lr_decay_gamma,
                                                                    patience=c.lr_decay_patience, cooldown=10)
        self.es = EarlyStopping(c.patience)
        self.scaler = torch.amp.GradScaler("cuda", enabled=c.amp == "fp16")
        self.loss_fn = LOSS_FUNCTIONS["mse" if self.spec.kind == "spectrogram" else c.loss]
        train_ds, valid_ds = _datasets(c, self.spec.kind, plan.meta, plan.valid_meta)
        self.train_loader = CacheLoader(train_ds, batch_size=c.batch_size, shuffle=True, num_workers=c.nb_workers, seed=c.seed,
                                        rank=ctx.rank, world_size=ctx.world_size)
        self.validates = valid_ds is not None
        self.valid_loader = None
        if self.validates:
            # open-unmix validates whole tracks one by one; fixed-length excerpts can share batches
            valid_batch = 1 if c.valid_seq_dur is None else c.batch_size
            self.valid_loader = CacheLoader(valid_ds, batch_size=valid_batch, shuffle=False, num_workers=0,
                                            rank=ctx.rank, world_size=ctx.world_size)
        # every rank must take the same number of optimiser steps (each one all-reduces
        # gradients): the smallest share, ceil(floor(n / world) / batch)
        self.nb_batches = -(-(len(train_ds) // ctx.world_size) // c.batch_size)
        self.history: list[dict] = []
        self.best_epoch = 0
        self.first_epoch = 1
        self.stopped_early = False
        self.curves_drawn = -math.inf
        s = plan.meta.settings
        self.sep_conf = separator_conf(s.sample_rate, s.n_fft, s.n_hop, c.nb_channels)
        if plan.resume is not None:
            self._restore(plan.resume)

    # -- state --

    def _restore(self, state: dict) -> None:
        path = self.files.checkpoint
        try:
            self.model.load_state_dict(state["state_dict"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler.is_enabled() and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.es.load_state_dict(state["early_stopping"])
            self.history = list(state["history"])
            self.best_epoch = int(state["best_epoch"])
            self.first_epoch = int(state["epochs_trained"]) + 1
            self.stopped_early = bool(state["stopped_early"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise CheckpointError(path, f"does not fit the model and optimiser the flags describe ({first}); "
                                        "pass --force to start over") from exc
        set_rng_state(state["rng"])

    def _checkpoint(self, epoch: int) -> dict:
        return {
            "format": "umxtools.checkpoint", "format_version": 1, "umxtools_version": __version__,
            # open-unmix's keys (its train.py --checkpoint reads epoch, state_dict, optimizer, scheduler)
            "epoch": epoch + 1, "state_dict": self.model.state_dict(), "best_loss": self.es.best,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epochs_trained": epoch, "best_epoch": self.best_epoch, "early_stopping": self.es.state_dict(),
            "stopped_early": self.stopped_early,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "history": self.history, "identity": self.plan.identity, "targets": self.targets,
            "model": {"class": self.spec.cls, "args": self.spec.args, "kind": self.spec.kind},
            "world_size": self.ctx.world_size, "rng": rng_state(),
        }

    # -- loop --

    def fit(self) -> None:
        c, ctx = self.config, self.ctx
        if ctx.main:
            remove_stale_tmp(self.files)
            for p in self.plan.delete:  # --force: the earlier run goes only now that every check passed
                p.unlink(missing_ok=True)
        finished = self._finished()
        if finished is not None:
            # a finished run resumed (a requeued job, a Makefile rerun with the same EPOCHS): say
            # so and write nothing, unless a kill left the derived files behind the checkpoint
            if ctx.main and not self._derived_current():
                self._heal()
                finished += "; the files derived from the checkpoint were rewritten"
            distributed.barrier(ctx)
            self._emit("note", {"message": f"{self.files.checkpoint}: {finished}"})
            return
        if ctx.main and self.plan.resume is not None:
            self._heal()
        distributed.barrier(ctx)
        self._emit("start", {"first_epoch": self.first_epoch, "epochs": c.epochs, "batches": self.nb_batches,
                             "device": str(self.device), "world_size": ctx.world_size, "model": self.spec.cls,
                             "parameters": sum(p.numel() for p in self.model.parameters()), "targets": self.targets,
                             "output": str(self.files.folder), "resumed": self.plan.resume is not None,
                             "validates": self.validates})
        for note in self._start_notes():
            self._emit("note", {"message": note})
        started = time.perf_counter()
        for epoch in range(self.first_epoch, c.epochs + 1):
            torch.manual_seed(_epoch_seed(c.seed, epoch, ctx.rank))
            t0 = time.perf_counter()
            train_loss, train_parts, samples, speed, wait = self._train_epoch(epoch)
            if self.validates:
                valid_loss, valid_parts = self._valid_epoch()
                if not math.isfinite(valid_loss):
                    raise self._valid_failure(epoch, valid_loss, train_loss)
                self.scheduler.step(valid_loss)
                stop = self.es.step(valid_loss)
                best = valid_loss == self.es.best  # open-unmix's test
            else:
                # no validation: the learning rate still decays when the training loss stops
                # falling (the optimiser is stuck, whatever the model generalises); early stopping
                # guards against overfitting, which only a held-out loss shows, so it is off, and
                # every epoch's weights are kept (best == last)
                valid_loss, valid_parts = None, [None] * len(self.targets)
                self.scheduler.step(train_loss)
                stop, best = False, True
            if best:
                self.best_epoch = epoch
            row = {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss, "best": best,
                   "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 3),
                   "samples": samples, "samples_per_s": round(speed, 2), "data_wait": round(wait, 4)}
            if len(self.targets) > 1:
                for t, tl, vl in zip(self.targets, train_parts, valid_parts):
                    row[f"train_loss_{t}"], row[f"valid_loss_{t}"] = tl, vl
            self.history.append(row)
            self.stopped_early = stop
            out_of_time = c.time_limit is not None and time.perf_counter() - started >= 60 * c.time_limit
            if c.time_limit is not None:  # every rank must stop after the same epoch: any clock decides
                out_of_time = distributed.all_sum([float(out_of_time)], ctx, self.device)[0] > 0
            if ctx.main:
                self._save(epoch, best, final=stop or out_of_time or epoch == c.epochs)
            self._emit("epoch", {**row, "epochs": c.epochs, "best_epoch": self.best_epoch, "best_loss": self.es.best})
            if stop:
                self._emit("stop", {"epoch": epoch, "reason": f"early stopping (no better validation loss in {c.patience} epochs)"})
                break
            if out_of_time:
                self._emit("stop", {"epoch": epoch, "reason": f"time limit ({c.time_limit:g} min); --resume continues"})
                break
        distributed.barrier(ctx)

    def _emit(self, event: str, info: dict) -> None:
        if self.report is not None:
            self.report(event, info)

    def _finished(self) -> str | None:
        """Why a resumed run has nothing left to do (None when it has)."""
        trained = self.first_epoch - 1
        if self.stopped_early:
            return (f"the run stopped early after epoch {trained} (no better validation loss in {self.config.patience} epochs): "
                    "nothing to do (--force starts over)")
        if trained >= self.config.epochs:  # equal: fewer was refused before anything was written
            return f"already trained {trained} epochs (--epochs {self.config.epochs}): nothing to do (raise --epochs to train longer)"
        return None

    def _derived_current(self) -> bool:
        """Whether the files derived from the checkpoint (metadata, history, weights, exports,
        separator.json) are those of its epoch: a kill between the checkpoint and them leaves
        them an epoch behind."""
        files = self.files
        try:
            meta = json.loads(files.metadata.read_text())
            listed = json.loads(files.separator.read_text()).get("targets", [])
            recorded = meta.get("training", meta).get("epochs_trained")
        except (OSError, ValueError, AttributeError):
            return False
        exports = [p for t in files.exports for p in (files.export_weights(t), files.export_metadata(t))]
        targets = list(files.exports) if files.name == MODEL_RUN else [files.name]
        return (recorded == self.first_epoch - 1 and files.history.exists() and files.weights.exists()
                and all(p.exists() for p in exports) and all(t in listed for t in targets))

    def _start_notes(self) -> list[str]:
        """What a user must know before the first epoch, even with ``-q``."""
        c, meta, notes = self.config, self.plan.meta, []
        if not self.validates:
            notes.append(f"{self.files.folder}: no --valid: no validation; the weights kept are the last epoch's, the learning rate "
                         "decays when the training loss stops falling, and there is no early stopping (--epochs or --time-limit "
                         "end the run)")
        short = _short_tracks(meta, c.seq_dur, self.spec.kind)
        if short:
            names = ", ".join(repr(t.name) for t in short[:3]) + (", ..." if len(short) > 3 else "")
            notes.append(f"{meta.path}: {len(short)} of {len(meta.tracks)} tracks are shorter than --seq-dur {c.seq_dur:g} s and "
                         f"are never sampled ({names})")
        return notes

    def _valid_failure(self, epoch: int, valid_loss: float, train_loss: float) -> UmxError:
        """The error for a non-finite validation loss: the validation cache when its data is
        damaged (its checksums are verified now: one more read of what validation reads every
        epoch), else the model, which diverged."""
        from umxtools.cache import check_cache

        valid, kept = self.plan.valid_meta.path, self._kept(epoch)
        # a stale input (--allow-stale) is no damage: the cache still holds what it was built from
        damage = [p for p in check_cache(valid).problems if not p.endswith("(stale)")]
        if damage:
            more = f" and {len(damage) - 1} more" if len(damage) > 1 else ""
            return CacheError(valid, f"validation loss is {valid_loss} in epoch {epoch}: the validation cache is damaged "
                                     f"({damage[0]}{more}); run umxtools cache check {valid}, and rebuild it; stopped, {kept}")
        lr = self.optimizer.param_groups[0]["lr"]
        return TrainingError(self.files.folder, f"validation loss is {valid_loss} in epoch {epoch} (training loss {train_loss:.4g}) "
                                                f"and the validation cache is intact: the model diverged; stopped, {kept}; lower --lr "
                                                f"(now {lr:g})")

    def _kept(self, epoch: int) -> str:
        if epoch > 1 or self.plan.resume is not None:
            return f"the checkpoint of epoch {epoch - 1} is kept"
        return "nothing was written"

    def _prepare_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.config.nb_channels == 1:
            # open-unmix's mono models see the channel mean (ComplexNorm(mono=True) for magnitudes)
            x, y = x.mean(1, keepdim=True), y.mean(2, keepdim=True)
        return x, y

    def _forward(self, net, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-target losses ``(targets,)`` of one batch."""
        amp = self.config.amp
        with torch.autocast(self.device.type, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext():
            out = net(x)
        if isinstance(out, (list, tuple)):  # the guide's OpenUnmixJoint returns a list of targets
            out = torch.stack(list(out), dim=1)
        if out.dim() == y.dim() - 1 and y.shape[1] == 1:
            out = out.unsqueeze(1)  # a single-target model may leave out the targets axis
        if out.shape != y.shape:
            axes = "(batch, targets, channels, bins, frames)" if self.spec.kind == "spectrogram" else "(batch, targets, channels, samples)"
            raise ModelError(self.spec.cls, f"forward returned shape {tuple(out.shape)}, expected {tuple(y.shape)} {axes}")
        return self.loss_fn(out.float(), y, x)

    def _train_epoch(self, epoch: int) -> tuple[float, list[float], int, float, float]:
        """Mean training loss (weighted by batch size, over all ranks), per-target means, samples
        (all ranks), samples/s, and the share of the step time spent waiting for data."""
        self.net.train()
        self.train_loader.sampler.set_epoch(epoch)
        k = len(self.targets)
        total = [0.0] * (k + 1)  # per-target loss sums, sample count
        wait = elapsed = 0.0
        it = iter(self.train_loader)
        try:
            for b in range(self.nb_batches):
                t0 = time.perf_counter()
                x, y = next(it)
                t1 = time.perf_counter()
                x, y = self._prepare_batch(x, y)
                parts = self._forward(self.net, x, y)
                loss = parts.sum()
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                n = x.shape[0]
                # one collective per step: progress shows the global loss, and a NaN on any rank
                # stops every rank at the same step
                step = distributed.all_sum([*(parts.detach() * n).tolist(), float(n)], self.ctx, self.device)
                if not all(math.isfinite(v) for v in step):
                    raise TrainingError(self.files.folder, f"loss is NaN in epoch {epoch} (batch {b + 1}); stopped, {self._kept(epoch)}; "
                                                           "lower --lr or check the data")
                total = [a + v for a, v in zip(total, step)]
                t2 = time.perf_counter()
                wait, elapsed = wait + (t1 - t0), elapsed + (t2 - t0)
                self._emit("batch", {"epoch": epoch, "batch": b + 1, "batches": self.nb_batches,
                                     "loss": sum(total[:k]) / total[k], "samples_per_s": step[k] / max(t2 - t0, 1e-9)})
        finally:
            it.close()  # stops the loader's workers when the rank's share was cut short
        count = total[k]
        parts = [v / count for v in total[:k]]
        return sum(parts), parts, int(count), count / max(elapsed, 1e-9), wait / max(elapsed, 1e-9)

    def _valid_epoch(self) -> tuple[float, list[float]]:
        """Mean validation loss over the validation excerpts (whole tracks by default), all ranks."""
        assert self.valid_loader is not None
        self.model.eval()
        k = len(self.targets)
        total = [0.0] * (k + 1)
        with torch.no_grad():
            for x, y in self.valid_loader:
                x, y = self._prepare_batch(x, y)
                parts = self._forward(self.model, x, y)
                total = [a + v for a, v in zip(total, [*(parts * x.shape[0]).tolist(), float(x.shape[0])])]
        total = distributed.all_sum(total, self.ctx, self.device)
        parts = [v / total[k] for v in total[:k]]
        return sum(parts), parts

    # -- files (rank 0) --

    def _save(self, epoch: int, best: bool, final: bool) -> None:
        """Weights (when best) first, then the checkpoint, then what derives from it."""
        if best:
            self._save_weights()
        save_torch(self.files.checkpoint, self._checkpoint(epoch))
        self._write_derived(epoch, final)

    def _save_weights(self) -> None:
        save_torch(self.files.weights, self.model.state_dict())
        for t, part in self._exports().items():
            save_torch(self.files.export_weights(t), part.state_dict())

    def _exports(self) -> dict:
        return self.model.target_models() if self.files.exports else {}

    def _heal(self) -> None:
        """After a kill: the derived files of the checkpoint's epoch, and its weights if it was the best
        (always, without validation)."""
        state = self.plan.resume
        if state["best_epoch"] == state["epochs_trained"]:
            self._save_weights()
        if self.history:
            self._write_derived(self.history[-1]["epoch"], final=True)

    def _write_derived(self, epoch: int, final: bool = False) -> None:
        files = self.files
        if files.name == MODEL_RUN:
            write_json(files.metadata, self._model_json(epoch))
            for t in files.exports:
                write_json(files.export_metadata(t), self._umx_json(epoch, t))
        else:
            write_json(files.metadata, self._umx_json(epoch, files.name))
        write_history(files.history, self.history)
        write_separator(files, self.sep_conf)
        # the figure costs 0.3-0.5 s: redrawn at most every CURVES_EVERY_S and when training ends
        if final or time.perf_counter() - self.curves_drawn >= CURVES_EVERY_S:
            write_curves(files)
            self.curves_drawn = time.perf_counter()

    def _summary(self, epoch: int, target: str | None = None) -> dict:
        """Loss histories as open-unmix's <target>.json names them (one target's when given)."""
        suffix = f"_{target}" if target is not None and len(self.targets) > 1 else ""
        train = [r[f"train_loss{suffix}"] for r in self.history]
        # without validation there are no valid losses (not a list of nulls): best_loss is null
        valid = [r[f"valid_loss{suffix}"] for r in self.history if r[f"valid_loss{suffix}"] is not None]
        best_row = next((r for r in self.history if r["epoch"] == self.best_epoch), None)
        return {"epochs_trained": epoch, "best_epoch": self.best_epoch,
                "best_loss": best_row[f"valid_loss{suffix}"] if best_row else None,
                "weights_kept": "best_valid_loss" if self.validates else "last_epoch",
                "train_loss_history": train, "valid_loss_history": valid,
                "train_time_history": [r["seconds"] for r in self.history], "num_bad_epochs": self.es.num_bad_epochs}

    def _provenance(self) -> dict:
        return {"umxtools_version": __version__, "command": self.config.command,
                "cache": cache_identity(self.plan.meta), "valid_cache": cache_identity(self.plan.valid_meta)}

    def _umx_json(self, epoch: int, target: str) -> dict:
        """open-unmix's ``<target>.json``: ``args`` with what ``load_target_models`` reads."""
        s, a = self.plan.meta.settings, self.spec.args
        args = {**self.config.args(), "target": target, "nfft": s.n_fft, "nhop": s.n_hop, "nb_channels": a["nb_channels"],
                "hidden_size": a["hidden_size"], "nb_layers": a["nb_layers"], "unidirectional": a["unidirectional"],
                "max_bin": a["max_bin"]}
        return {"args": args, "rate": float(s.sample_rate), **self._summary(epoch, target), **self._provenance()}

    def _model_json(self, epoch: int) -> dict:
        """docs/model-format.md's ``model.json``."""
        s = self.plan.meta.settings
        return {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "kind": self.spec.kind, "class": self.spec.cls,
                "args": self.spec.args, "targets": self.targets, "weights": self.files.weights.name,
                "sample_rate": s.sample_rate, "n_fft": s.n_fft, "n_hop": s.n_hop, "nb_channels": self.config.nb_channels,
                "training": {"args": self.config.args(), "loss": self.plan.identity["loss"], **self._summary(epoch)},
                **self._provenance()}
