"""Loading a model for separation: which loader a source goes to, and model folders rebuilt.

:func:`load_model` dispatches: a demucs ``.th`` file or name and an MSST ``.ckpt`` go to
:mod:`umxtools.models.foreign`; a folder with a ``model.json`` (umxtools') or a
``separator.json`` (open-unmix's layout) is rebuilt here from what :mod:`umxtools.model_folder`
reads and checks in its files (docs/model-format.md); a published open-unmix name goes to
:mod:`umxtools.pretrained`. Every loader returns a
:class:`~umxtools.models.separation_model.SeparationModel`, built with the helpers of that module.

A model folder is data: its files never run code unless the caller trusts it. Weights are read
with ``torch.load(weights_only=True)``; a ``model.json`` whose class is not one of umxtools' own
(``umxtools.*`` modules) is refused without ``trust_code`` (``--trust-code``); every target and
file name read from its JSON files becomes a path only through :func:`umxtools.fileio.safe_child`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from umxtools import fileio, model_folder, pretrained
from umxtools.errors import UntrustedCodeError
from umxtools.model_folder import MODEL_FORMAT, MODEL_JSON, SEPARATOR_JSON
from umxtools.models import ModelError, load_class
from umxtools.models.separation_model import (
    SeparationModel,
    file_identity,
    load_state,
    select_targets,
    umx_args,
    umx_from_state,
)
from umxtools.models.umx import OpenUnmix

# re-exported: SeparationModel and its helpers lived here before umxtools.models.separation_model
__all__ = ["MODEL_FORMAT", "TRUST_ENV", "TRUST_HINT", "SeparationModel", "builtin_spec", "file_identity", "load_model",
           "load_state", "select_targets", "umx_args", "umx_from_state"]

# the environment variable that trusts model folders' code where no flag can be passed (bin/ scripts)
TRUST_ENV = "UMXTOOLS_TRUST_CODE"
TRUST_HINT = f"if you trust this model folder, pass --trust-code (or set {TRUST_ENV}=1)"


def load_model(source: str | Path, targets: list[str] | None = None, identity: bool = True,
               trust_code: bool = False, config: str | Path | None = None, ema: bool = False) -> SeparationModel:
    """A model folder or a published model name -> :class:`SeparationModel` on the CPU, in eval mode.

    Args:
        source: a folder (``model.json`` or open-unmix's ``separator.json`` layout) or one of
            :data:`umxtools.pretrained.PUBLISHED`.
        targets: the targets to separate, a subset of the model's (default: all, in its order).
        identity: hash the weight files for the provenance record (``SeparationModel.identity``).
        trust_code: import the Python file or module a ``model.json`` names outside ``umxtools``.
        config: an MSST YAML config; ``source`` is then its ``.ckpt``. A demucs ``.th`` file or
            name (``htdemucs``, ``htdemucs_ft``, ...) needs none (:mod:`umxtools.models.foreign`).
        ema: a trained folder's EMA weights (``ema_weights`` of its JSON files, ``train --ema``)
            instead of its raw weights; refused for any other source.
    Raises :class:`ModelError` for an unknown name, a folder that is not a model, missing weights;
    :class:`UntrustedCodeError` for a folder that would run code without ``trust_code``;
    :class:`UnsafeNameError` for a target or file name that would leave the folder.
    """
    from umxtools.models import foreign  # imports demucs only when used

    for t in targets or []:
        fileio.check_name(t, "target", "--targets")
    path = Path(source).expanduser()
    if ema and not path.is_dir():
        raise ModelError(source, "--ema takes the EMA weights of a model folder trained with train --ema; this is not a folder")
    if config is not None or path.suffix in (".th", ".ckpt") or str(source) in foreign.DEMUCS_NAMES:
        if config is not None or path.suffix == ".ckpt":
            if config is None:
                raise ModelError(path, "an MSST checkpoint needs its YAML config (--model-config)")
            return foreign.msst_separation_model(path, config, targets, identity=identity)
        return foreign.demucs_separation_model(source, targets, identity=identity)
    if path.exists():
        if not path.is_dir():
            raise ModelError(path, "is a file; a model is a folder (model.json or separator.json + <target>.pth)")
        if (path / MODEL_JSON).exists():
            model = _load_umxtools_folder(path, targets, trust_code, ema)
        elif (path / SEPARATOR_JSON).exists():
            model = _load_openunmix_folder(path, targets, ema)
        else:
            raise ModelError(path, "not a model folder: it has neither model.json nor separator.json")
        if identity:
            model.identity["files"] = {p.name: file_identity(p) for p in _weight_files(model, path)}
        return model
    if str(source) in pretrained.PUBLISHED:
        return pretrained.load_published(str(source), targets, identity=identity)
    raise ModelError(source, f"no such model folder (made by: umxtools train CACHE -o PATH ...), and not a published model "
                              f"({', '.join(pretrained.PUBLISHED)})")


def _weight_files(model: SeparationModel, folder: Path) -> list[Path]:
    return [folder / name for name in model.identity.get("weights", [])]


# --- open-unmix's layout ---------------------------------------------------------------------------


def _ema_weights(folder: Path, meta_path: Path) -> Path:
    """The EMA weights a ``model.json`` or ``<target>.json`` names (``ema_weights``), checked."""
    name = model_folder.read_json(meta_path).get("ema_weights") if meta_path.is_file() else None
    if not isinstance(name, str):
        raise ModelError(meta_path, "names no EMA weights (trained without train --ema); drop --ema")
    path = fileio.safe_child(folder, name, "EMA weights file", meta_path)
    if not path.is_file():
        raise ModelError(folder, f"has no EMA weights file {name}")
    return path


def _load_openunmix_folder(folder: Path, targets: list[str] | None, ema: bool = False) -> SeparationModel:
    conf = model_folder.read_separator(folder)
    # every target is a checked plain name from here on: <target>.pth and <target>.json stay in the folder
    chosen = select_targets(conf.targets, targets, folder)
    models, weights = {}, []
    for target in chosen:
        path = _ema_weights(folder, folder / f"{target}.json") if ema else model_folder.weights_path(folder, target)
        if path is None:
            raise ModelError(folder, f"has no weights for target {target!r} ({target}.pth)")
        state = load_state(path)
        nfft = model_folder.target_nfft(folder, target)
        if nfft is not None and nfft != conf.nfft:
            raise ModelError(folder / f"{target}.json", f"was trained with nfft {nfft}, separator.json says {conf.nfft}")
        models[target] = umx_from_state(state, conf.nfft, path)
        if models[target].nb_channels != conf.nb_channels:
            raise ModelError(path, f"takes {models[target].nb_channels} channel(s), separator.json says {conf.nb_channels}")
        weights.append(path.name)
    identity = {"source": str(folder.resolve()), "format": "openunmix", "class": "umxtools.models.umx:OpenUnmix",
                "weights": weights, "args": {t: umx_args(m) for t, m in models.items()}}
    return SeparationModel(kind="spectrogram", targets=chosen, sample_rate=conf.sample_rate, nb_channels=conf.nb_channels,
                           n_fft=conf.nfft, n_hop=conf.nhop, umx=models, identity=identity)


# --- umxtools' model.json ----------------------------------------------------------------------------


def builtin_spec(spec: str) -> bool:
    """Whether a class spec names a module of umxtools itself (no code from outside the package)."""
    module_name, sep, class_name = spec.rpartition(":")
    return (bool(sep) and module_name.startswith("umxtools.") and not module_name.endswith(".py")
            and all(part.isidentifier() for part in module_name.split(".")) and class_name.isidentifier())


def _load_umxtools_folder(folder: Path, targets: list[str] | None, trust_code: bool = False, ema: bool = False) -> SeparationModel:
    meta = model_folder.read_model_json(folder)
    spec, kind, available = meta.spec.cls, meta.spec.kind, meta.targets
    chosen = select_targets(available, targets, folder)
    if not builtin_spec(spec) and not trust_code:
        raise UntrustedCodeError(meta.path, f"its class {spec!r} is Python code from outside umxtools, which would run on load; "
                                            f"{TRUST_HINT}")
    cls = load_class(_spec_near(spec, folder))
    if cls.kind != kind:
        raise ModelError(meta.path, f"says kind {kind!r} but {spec} is a {cls.kind} model")
    args = meta.spec.args
    try:
        module = cls(**args)
    except TypeError as exc:
        raise ModelError(spec, f"cannot construct with {json.dumps(args, sort_keys=True)} ({exc})") from exc
    except Exception as exc:  # user code: any failure is one line, not a traceback
        raise ModelError(spec, f"constructor failed: {type(exc).__name__}: {str(exc).strip()[:200]}") from exc
    weights = _ema_weights(folder, meta.path) if ema else meta.weights
    if not weights.is_file():
        raise ModelError(folder, f"has no weights file {weights.name}")
    state = load_state(weights)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(weights, f"does not fit {spec} with these args ({str(exc).strip().splitlines()[0][:200]})") from exc
    module.eval()
    for p in module.parameters():
        p.requires_grad = False
    identity = {"source": str(folder.resolve()), "format": MODEL_FORMAT, "class": spec, "args": args, "weights": [weights.name]}
    model = SeparationModel(kind=kind, targets=chosen, sample_rate=meta.sample_rate, nb_channels=meta.nb_channels,
                            n_fft=meta.n_fft, n_hop=meta.n_hop, module=module, module_targets=list(available),
                            identity=identity, segmenting=meta.segmenting)
    if kind == "spectrogram":
        parts = _umx_parts(module, available)
        if parts is not None:
            model.umx, model.module, model.module_targets = {t: parts[t] for t in chosen}, None, None
    return model


def _spec_near(spec: str, folder: Path) -> str:
    """A ``file.py:CLASS`` spec relative to the model folder, where that file exists."""
    module_name, _, class_name = spec.rpartition(":")
    if module_name.endswith(".py") and not Path(module_name).is_absolute() and (folder / module_name).exists():
        return f"{folder / module_name}:{class_name}"
    return spec


def _umx_parts(module: torch.nn.Module, targets: list[str]) -> dict[str, OpenUnmix] | None:
    """The per-target :class:`OpenUnmix` models of a joint model, if its output is exactly theirs.

    A model qualifies with a ``target_models()`` method returning one ``OpenUnmix`` per target
    (``umxtools.models.joint.OpenUnmixJoint`` has it). Its forward is then checked on a short
    random input against the parts stacked in ``targets`` order; a model that does anything more
    is run whole instead.
    """
    get = getattr(module, "target_models", None)
    if not callable(get):
        return None
    try:
        parts = get()
    except Exception:  # a method of that name with another meaning: not a joint model
        return None
    if not isinstance(parts, dict) or list(parts) != list(targets) or not all(isinstance(m, OpenUnmix) for m in parts.values()):
        return None
    first = next(iter(parts.values()))
    x = torch.rand(1, first.nb_channels, first.nb_output_bins, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = module(x)
        stacked = torch.stack([m(x) for m in parts.values()], dim=1)
    if whole.shape != stacked.shape or not torch.equal(whole, stacked):
        return None
    return parts
