"""What a training run is, checked before anything is written: flags, caches, model, datasets.

:func:`prepare` turns a :class:`TrainConfig` (every flag of ``umxtools train``) into a
:class:`Plan`: the caches opened and checked against the flags, the model built with its input
normalisation from the training cache's mixture statistics, the training and validation datasets
built (once: the loop trains on these), and what the run's files will record
(:class:`umxtools.model_folder.RunInfo`). Bad input fails here, so it leaves no files;
:mod:`umxtools.training` then decides under the run's lock what the output folder holds and trains.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from umxtools import distributed, fileio
from umxtools.cache import MIXTURE, CacheMeta, open_cache
from umxtools.errors import CacheError, OutputError, UmxError, UsageError
from umxtools.loaders import IndexDataset, RandomDataset
from umxtools.losses import loss_name, loss_terms
from umxtools.model_folder import MODEL_RUN, ModelSpec, Resumed, RunFiles, RunInfo, cache_identity
from umxtools.models import JOINT, MODELS, OFFERED_ARGS, ModelError, OpenUnmix, OpenUnmixJoint, load_class, spec_of
from umxtools.msst import MsstConfig, read_msst_config
from umxtools.transforms import bandwidth_to_max_bin

AUGMENTATIONS = ("gain", "channelswap")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
STATS_ARGS = ("input_mean", "input_scale")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("plateau", "cosine")
VALID_METRICS = ("loss", "sdr")
# each family's training recipe: what a flag left out (None in TrainConfig) becomes. umx and
# waveform keep open-unmix's recipe exactly (Adam, ReduceLROnPlateau per epoch, no clipping);
# the transformers and HTDemucs get AdamW and a per-step cosine decay (Loshchilov & Hutter,
# "Decoupled weight decay regularization" and "SGDR", ICLR 2019/2017), the roformers with a
# linear warm-up and clipping as transformers usually need (a common choice, not measured
# here); HTDemucs without either, as demucs's own recipe (clip_grad 0). The roformers' loss is
# the nearest to MSST's (L1 plus multi-resolution STFT). A MODULE:CLASS model gets "custom".
# Best weights, early stopping and the plateau decay follow the validation loss (open-unmix) or
# the validation uSDR (what MSST and demucs select on).
RECIPE_KEYS = ("loss", "optimizer", "lr_schedule", "warmup_steps", "clip_grad_norm", "valid_metric")
_OPEN_UNMIX = {"loss": "l1", "optimizer": "adam", "lr_schedule": "plateau", "warmup_steps": 0, "clip_grad_norm": 0.0,
               "valid_metric": "loss"}
_ROFORMER = {"loss": "l1+cstft", "optimizer": "adamw", "lr_schedule": "cosine", "warmup_steps": 500, "clip_grad_norm": 1.0,
             "valid_metric": "sdr"}
# --model-config: MSST's architecture -> the family it trains (msst.ARCHITECTURES names the same classes)
MSST_FAMILIES = {"bs_roformer": "bsroformer", "mel_band_roformer": "melroformer"}
# the flags an MSST config fills in when they are left out (TrainConfig names)
CONFIG_FLAGS = ("model", "targets", "nb_channels", "seq_dur")
# MSST's constructor arguments umxtools sets itself: num_stems from --targets, stereo from --nb-channels
_MSST_OWN = ("num_stems", "stereo")
# the families separated with MSST's chunked rule (umxtools.segments.MsstPlan), and its default overlap
MSST_SEGMENTED = (MODELS["bsroformer"], MODELS["melroformer"])
MSST_NUM_OVERLAP = 4  # MSST's inference default
RECIPES: dict[str, dict] = {
    "umx": _OPEN_UNMIX, "waveform": _OPEN_UNMIX, "custom": _OPEN_UNMIX,
    "bsroformer": _ROFORMER, "melroformer": _ROFORMER,
    "htdemucs": {"loss": "l1", "optimizer": "adamw", "lr_schedule": "cosine", "warmup_steps": 0, "clip_grad_norm": 0.0,
                 "valid_metric": "sdr"},
}


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
    model_config: str | None = None  # an MSST YAML: the model's family and arguments, targets, channels, excerpt length
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
    # None: the family's (RECIPES, filled in by with_recipe)
    loss: str | None = None  # waveform models only: a term of losses.LOSSES["waveform"] or a "+"-joined sum
    optimizer: str | None = None  # OPTIMIZERS
    lr_schedule: str | None = None  # LR_SCHEDULES
    warmup_steps: int | None = None  # optimiser steps of linear warm-up
    clip_grad_norm: float | None = None  # 0: no clipping
    accumulate: int = 1  # batches per optimiser step
    valid_metric: str | None = None  # VALID_METRICS: what picks the best weights
    init_from: str | None = None  # a model folder, .pth, .th, .ckpt or demucs name: the initial weights
    ema: float = 0.0  # decay of the weights' exponential moving average after each optimiser step; 0: none
    nb_workers: int = 0
    device: str = "auto"
    amp: str | None = None
    time_limit: float | None = None  # minutes; stop after the epoch that passes it
    force: bool = False
    resume: bool = False
    allow_stale: bool = False
    command: list[str] | None = None
    # the CONFIG_FLAGS set explicitly (the CLI says which); None: those that differ from the defaults
    given: tuple[str, ...] | None = None

    def args(self) -> dict:
        """The flags as JSON (recorded in ``<target>.json`` / ``model.json``)."""
        d = asdict(self)
        for k in ("cache", "valid", "output"):
            d[k] = None if d[k] is None else str(d[k])
        d["targets"], d["source_augmentations"] = list(self.targets), list(self.source_augmentations)
        d.pop("command")
        d.pop("given")
        return d


@dataclass
class Plan:
    """Everything :func:`prepare` checked and built before writing anything."""

    config: TrainConfig
    meta: CacheMeta
    valid_meta: CacheMeta | None  # None: no validation
    model: torch.nn.Module
    info: RunInfo  # what the run's files record
    train_set: RandomDataset
    valid_set: IndexDataset | None  # None: no validation
    resume: Resumed | None = None  # the checkpoint to continue (set under the run's lock)
    init_note: str | None = None  # what --init-from loaded
    delete: list[Path] = field(default_factory=list)  # an earlier run's files (--force)

    @property
    def files(self) -> RunFiles:
        return self.info.files

    @property
    def spec(self) -> ModelSpec:
        return self.info.spec


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


def prepare(config: TrainConfig) -> Plan:
    """Check the caches, targets, settings and model; build the model and the datasets. Reads no
    output file: :func:`umxtools.training.plan_output_of` decides, under the run's lock, what the
    output folder's files mean. The plan's config has the MSST config read in
    (:func:`with_model_config`) and the family's recipe filled in."""
    config, msst = with_model_config(config)
    config = with_recipe(config)
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
    if msst is not None:
        _check_config_rate(msst, meta)
    valid_meta = None if config.valid is None else open_cache(config.valid, expect=s, check_stale=not config.allow_stale)
    torch.manual_seed(config.seed)  # the initial weights; the same on every rank
    model, spec = build_model(config, meta)
    if config.valid_metric == "sdr" and spec.kind != "waveform":
        raise UsageError(None, f"--valid-metric sdr needs a waveform model: {config.model} estimates magnitudes, which have no "
                               "waveform to score without the phase and Wiener filtering of separate; use --valid-metric loss")
    init_note = None
    if config.init_from is not None:
        init_note = _init_weights(config, model, msst)
    # built before anything is written, so a missing target fails early; the loop trains on them
    train_set, valid_set = _datasets(config, spec.kind, meta, valid_meta)
    files = _run_files(config)
    if config.model == "umx" and (config.nb_layers != 3 or config.unidirectional):
        # openunmix.utils.load_target_models rebuilds OpenUnmix from hidden_size alone and loads
        # with strict=False: other LSTM layouts fail or, with fewer layers, silently keep random ones
        warnings.warn(f"{files.folder}: open-unmix's load_separator rebuilds only 3-layer bidirectional UMX models; "
                      "this one loads in umxtools only", stacklevel=2)
    info = RunInfo(files, spec, config.args(), config.command, s.sample_rate, s.n_fft, s.n_hop, config.nb_channels,
                   loss_name(spec.kind, config.loss), cache_identity(meta), cache_identity(valid_meta),
                   segmenting=_segmenting(config, spec, msst, s.sample_rate))
    return Plan(config, meta, valid_meta, model, info, train_set, valid_set, init_note=init_note)


def _init_weights(config: TrainConfig, model: torch.nn.Module, msst: MsstConfig | None) -> str:
    """``--init-from``: the matching weights copied into ``model``; the note saying what matched.
    An MSST ``.ckpt`` with ``--model-config`` (its config) gives each target its own stem's mask
    estimator, by the config's instruments."""
    from umxtools.init_weights import describe, init_from, msst_stems, source_state

    state = source_state(config.init_from, list(config.targets), config.joint)
    if msst is not None and msst.targets and Path(config.init_from).suffix == ".ckpt":
        state = msst_stems(state, msst.targets, list(config.targets))
    matched = init_from(model, state)
    if not matched["loaded"]:
        raise UsageError(None, f"--init-from {config.init_from}: no weight matches the model's names and shapes "
                               f"({len(matched['unexpected'])} unexpected, {len(matched['mismatched'])} of another shape)")
    return describe(config.init_from, matched)


def with_model_config(config: TrainConfig) -> tuple[TrainConfig, MsstConfig | None]:
    """``config`` with its MSST YAML (``model_config``) read in, and the config as read (None
    without one).

    The YAML gives the family (``bs_roformer`` -> ``bsroformer``, ``mel_band_roformer`` ->
    ``melroformer``), the constructor arguments of ``model:`` (without ``num_stems`` and ``stereo``,
    which follow the targets and channels; ``model_args`` override any of them), and, for the
    :data:`CONFIG_FLAGS` not given (``config.given``), the targets (``training:``), one channel when
    ``stereo`` is false and ``seq_dur = chunk_size / sample_rate``. The optimiser and learning-rate
    settings of ``training:`` are not read: the flags decide. Applying it twice changes nothing.
    """
    if config.model_config is None:
        return config, None
    path = Path(config.model_config).expanduser().resolve()
    msst = read_msst_config(path)
    architecture = msst.architecture()
    family = MSST_FAMILIES[architecture]
    given = set(config.given) if config.given is not None else _differing(config)
    if "model" in given and config.model != family:
        raise UsageError(None, f"--model {config.model} conflicts with --model-config {config.model_config}, a {architecture} "
                               f"model (--model {family}); drop --model")
    args = {k: v for k, v in msst.model.items() if k not in _MSST_OWN and k not in OFFERED_ARGS}
    changes = {"model": family, "model_config": str(path), "model_args": {**args, **config.model_args}}
    if "targets" not in given and msst.targets:
        changes["targets"] = tuple(msst.targets)
    if "nb_channels" not in given and msst.model.get("stereo") is False:
        changes["nb_channels"] = 1
    if "seq_dur" not in given and msst.chunk_size is not None and msst.sample_rate is not None:
        changes["seq_dur"] = _seconds(msst.chunk_size, msst.sample_rate)
    return dataclasses.replace(config, **changes), msst


def _differing(config: TrainConfig) -> set[str]:
    """The :data:`CONFIG_FLAGS` whose value is not TrainConfig's default (taken as given)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in CONFIG_FLAGS}
    return {k for k, v in defaults.items() if (tuple(config.targets) if k == "targets" else getattr(config, k)) != v}


def _seconds(samples: int, sample_rate: int) -> float:
    """``samples / sample_rate`` as the loaders read it back: ``int(seconds * sample_rate)`` is ``samples``
    (the plain quotient can fall a rounding error short, one sample less)."""
    seconds = samples / sample_rate
    while int(seconds * sample_rate) < samples:
        seconds = math.nextafter(seconds, math.inf)
    return seconds


def _check_config_rate(msst: MsstConfig, meta: CacheMeta) -> None:
    """An MSST config's model was made for its ``audio: sample_rate``: refuse a cache of another rate."""
    rate = meta.settings.sample_rate
    for where, value in (("audio: sample_rate", msst.sample_rate), ("model: sample_rate", msst.model.get("sample_rate"))):
        if value is not None and value != rate:
            raise UsageError(msst.path, f"{where} is {value} Hz but the cache {meta.path} holds {rate} Hz audio; "
                                        "use a cache of the config's rate or another config")


def _segmenting(config: TrainConfig, spec: ModelSpec, msst: MsstConfig | None, sample_rate: int) -> dict | None:
    """How ``separate`` runs the model (model.json's ``segmenting``): the RoFormers by MSST's chunked
    rule, with the config's ``chunk_size`` and ``num_overlap`` when given, else chunks of the training
    excerpt and MSST's overlap; batches of one (MSST's fades depend on the batching). None: others."""
    if spec.cls not in MSST_SEGMENTED:
        return None
    chunk = msst.inference_chunk_size if msst is not None else None
    overlap = msst.num_overlap if msst is not None else None
    return {"rule": "msst", "chunk_size": chunk or round(config.seq_dur * sample_rate), "num_overlap": overlap or MSST_NUM_OVERLAP,
            "batch_size": 1}


def with_recipe(config: TrainConfig) -> TrainConfig:
    """``config`` with every recipe flag left out (None) set to the model family's
    (:data:`RECIPES`; a ``MODULE:CLASS`` model is ``custom``)."""
    recipe = RECIPES[config.model if config.model in RECIPES else "custom"]
    return dataclasses.replace(config, **{k: recipe[k] for k in RECIPE_KEYS if getattr(config, k) is None})


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
    try:
        loss_terms(c.loss)
    except ValueError as exc:
        raise UsageError(None, f"--loss {c.loss}: {exc}") from None
    for flag, value, known in (("--optimizer", c.optimizer, OPTIMIZERS), ("--lr-schedule", c.lr_schedule, LR_SCHEDULES),
                               ("--valid-metric", c.valid_metric, VALID_METRICS)):
        if value not in known:
            raise UsageError(None, f"unknown {flag} {value!r}; one of {', '.join(known)}")
    if c.warmup_steps < 0 or c.clip_grad_norm < 0:
        raise UsageError(None, "--warmup-steps and --clip-grad-norm must be at least 0")
    if c.accumulate < 1:
        raise UsageError(None, "--accumulate must be at least 1")
    if not 0 <= c.ema < 1:
        raise UsageError(None, f"--ema {c.ema:g}: the decay must be at least 0 (0: no average) and below 1")
    if c.amp is not None and c.amp not in AMP_DTYPES:
        raise UsageError(None, f"unknown --amp {c.amp!r}; one of {', '.join(AMP_DTYPES)}")
    if c.force and c.resume:
        raise UsageError(None, "--force and --resume exclude each other")
    if c.init_from is not None and c.resume:
        raise UsageError(None, "--init-from starts a fresh run; --resume continues one from its checkpoint: give one of them")
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


def short_tracks(meta: CacheMeta, seq_dur: float, kind: str) -> list:
    """The tracks the training sampler never draws (shorter than one excerpt)."""
    return [t for t in meta.tracks if not _excerpt_fits(meta, t, seq_dur, kind)]


def _run_files(c: TrainConfig) -> RunFiles:
    if c.model == "umx" and not c.joint:
        return RunFiles(Path(c.output), c.targets[0])
    return RunFiles(Path(c.output), MODEL_RUN, exports=tuple(c.targets) if c.joint else ())
