"""Loading a model folder for separation: open-unmix's folders and umxtools' ``model.json`` folders.

docs/model-format.md defines both layouts. A folder with a ``model.json`` is rebuilt from it (class
spec, constructor arguments, whole-model weights); otherwise ``separator.json`` plus one
``<target>.pth`` per target is an open-unmix folder whose UMX models are rebuilt from the state
dict shapes (what open-unmix reads from ``<target>.json`` is checked against them). Published
open-unmix weights by name are :mod:`umxtools.pretrained`'s, demucs and MSST files
:mod:`umxtools.models.foreign`'s; all three build the :class:`SeparationModel` of
:mod:`umxtools.models.separation_model`, which imports none of them (no import cycle).

A model folder is data: its files never run code unless the caller trusts it. Weights are read
with ``torch.load(weights_only=True)``; a ``model.json`` whose class is not one of umxtools' own
(``umxtools.*`` modules) is refused without ``trust_code`` (``--trust-code``); every target and
file name read from its JSON files becomes a path only through :func:`umxtools.fileio.safe_child`.

Every model becomes a :class:`SeparationModel`: either one :class:`OpenUnmix` per target, which
:mod:`umxtools.separation` runs with memory bounded independently of the track length, or any
module with the interface of its ``kind``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from umxtools import fileio, pretrained
from umxtools.errors import UntrustedCodeError
from umxtools.models import KINDS, ModelError, load_class
from umxtools.models.separation_model import (
    SeparationModel,
    file_identity,
    load_state,
    select_targets,
    target_names,
    umx_args,
    umx_from_state,
)
from umxtools.models.umx import OpenUnmix

# re-exported: SeparationModel and its helpers lived here before umxtools.models.separation_model
__all__ = ["MODEL_FORMAT", "TRUST_ENV", "TRUST_HINT", "SeparationModel", "builtin_spec", "file_identity", "load_model",
           "load_state", "select_targets", "umx_args", "umx_from_state"]

MODEL_FORMAT = "umxtools.model"
# the environment variable that trusts model folders' code where no flag can be passed (bin/ scripts)
TRUST_ENV = "UMXTOOLS_TRUST_CODE"
TRUST_HINT = f"if you trust this model folder, pass --trust-code (or set {TRUST_ENV}=1)"


def load_model(source: str | Path, targets: list[str] | None = None, identity: bool = True,
               trust_code: bool = False, config: str | Path | None = None) -> SeparationModel:
    """A model folder or a published model name -> :class:`SeparationModel` on the CPU, in eval mode.

    Args:
        source: a folder (``model.json`` or open-unmix's ``separator.json`` layout) or one of
            :data:`umxtools.pretrained.PUBLISHED`.
        targets: the targets to separate, a subset of the model's (default: all, in its order).
        identity: hash the weight files for the provenance record (``SeparationModel.identity``).
        trust_code: import the Python file or module a ``model.json`` names outside ``umxtools``.
        config: an MSST YAML config; ``source`` is then its ``.ckpt``. A demucs ``.th`` file or
            name (``htdemucs``, ``htdemucs_ft``, ...) needs none (:mod:`umxtools.models.foreign`).
    Raises :class:`ModelError` for an unknown name, a folder that is not a model, missing weights;
    :class:`UntrustedCodeError` for a folder that would run code without ``trust_code``;
    :class:`UnsafeNameError` for a target or file name that would leave the folder.
    """
    from umxtools.models import foreign  # imports demucs only when used

    for t in targets or []:
        fileio.check_name(t, "target", "--targets")
    path = Path(source).expanduser()
    if config is not None or path.suffix in (".th", ".ckpt") or str(source) in foreign.DEMUCS_NAMES:
        if config is not None or path.suffix == ".ckpt":
            if config is None:
                raise ModelError(path, "an MSST checkpoint needs its YAML config (--model-config)")
            return foreign.msst_separation_model(path, config, targets, identity=identity)
        return foreign.demucs_separation_model(source, targets, identity=identity)
    if path.exists():
        if not path.is_dir():
            raise ModelError(path, "is a file; a model is a folder (model.json or separator.json + <target>.pth)")
        if (path / "model.json").exists():
            model = _load_umxtools_folder(path, targets, trust_code)
        elif (path / "separator.json").exists():
            model = _load_openunmix_folder(path, targets)
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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(path, f"not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelError(path, "not a JSON object")
    return data


# --- open-unmix's layout ---------------------------------------------------------------------------


def _load_openunmix_folder(folder: Path, targets: list[str] | None) -> SeparationModel:
    conf = _read_json(folder / "separator.json")
    for key in ("nfft", "nhop", "nb_channels"):
        if not isinstance(conf.get(key), int) or conf[key] <= 0:
            raise ModelError(folder / "separator.json", f"needs a positive integer {key!r}")
    rate = conf.get("sample_rate", conf.get("rate"))
    if not isinstance(rate, (int, float)) or rate <= 0 or rate != int(rate):
        raise ModelError(folder / "separator.json", f"needs a positive whole 'sample_rate', has {rate!r}")
    available = conf.get("targets")
    if isinstance(available, list) and available:
        target_names(available, folder / "separator.json")
    else:
        # open-unmix's own separator.json has no target list: every <target>.json with weights
        available = target_names(sorted(p.stem for p in folder.glob("*.json") if p.name not in ("separator.json", "model.json")
                                         and _weights_path(folder, p.stem) is not None), folder)
    # every target is a checked plain name from here on: <target>.pth and <target>.json stay in the folder
    chosen = select_targets(available, targets, folder)
    models, weights = {}, []
    for target in chosen:
        path = _weights_path(folder, target)
        if path is None:
            raise ModelError(folder, f"has no weights for target {target!r} ({target}.pth)")
        state = load_state(path)
        meta_path = folder / f"{target}.json"
        meta = _read_json(meta_path) if meta_path.exists() else {}
        nfft = meta.get("args", {}).get("nfft", conf["nfft"])
        if nfft != conf["nfft"]:
            raise ModelError(meta_path, f"was trained with nfft {nfft}, separator.json says {conf['nfft']}")
        models[target] = umx_from_state(state, conf["nfft"], path)
        if models[target].nb_channels != conf["nb_channels"]:
            raise ModelError(path, f"takes {models[target].nb_channels} channel(s), separator.json says {conf['nb_channels']}")
        weights.append(path.name)
    identity = {"source": str(folder.resolve()), "format": "openunmix", "class": "umxtools.models.umx:OpenUnmix",
                "weights": weights, "args": {t: umx_args(m) for t, m in models.items()}}
    return SeparationModel(kind="spectrogram", targets=chosen, sample_rate=int(rate), nb_channels=conf["nb_channels"],
                           n_fft=conf["nfft"], n_hop=conf["nhop"], umx=models, identity=identity)


def _weights_path(folder: Path, target: str) -> Path | None:
    """``<target>.pth``, or a torch.hub-style ``<target>-<hash>.pth`` (open-unmix globs ``<target>*.pth``)."""
    exact = folder / f"{target}.pth"
    if exact.is_file():
        return exact
    hashed = sorted(folder.glob(f"{target}-*.pth"))
    return hashed[0] if hashed else None


# --- umxtools' model.json ----------------------------------------------------------------------------


def builtin_spec(spec: str) -> bool:
    """Whether a class spec names a module of umxtools itself (no code from outside the package)."""
    module_name, sep, class_name = spec.rpartition(":")
    return (bool(sep) and module_name.startswith("umxtools.") and not module_name.endswith(".py")
            and all(part.isidentifier() for part in module_name.split(".")) and class_name.isidentifier())


def _load_umxtools_folder(folder: Path, targets: list[str] | None, trust_code: bool = False) -> SeparationModel:
    meta_path = folder / "model.json"
    meta = _read_json(meta_path)
    if meta.get("format") != MODEL_FORMAT:
        raise ModelError(meta_path, f"not a umxtools model file (format {meta.get('format')!r}, expected {MODEL_FORMAT!r})")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ModelError(meta_path, f"kind must be one of {', '.join(KINDS)}, has {kind!r}")
    available = meta.get("targets")
    if not isinstance(available, list) or not available or not all(isinstance(t, str) for t in available):
        raise ModelError(meta_path, "needs a non-empty 'targets' list")
    target_names(available, meta_path)
    rate = meta.get("sample_rate")
    if not isinstance(rate, (int, float)) or rate <= 0 or rate != int(rate):
        raise ModelError(meta_path, f"needs a positive whole 'sample_rate', has {rate!r}")
    if kind == "spectrogram":
        for key in ("n_fft", "n_hop"):
            if not isinstance(meta.get(key), int) or meta[key] <= 0:
                raise ModelError(meta_path, f"a spectrogram model needs a positive integer {key!r}")
    chosen = select_targets(available, targets, folder)
    spec = str(meta.get("class", ""))
    if not builtin_spec(spec) and not trust_code:
        raise UntrustedCodeError(meta_path, f"its class {spec!r} is Python code from outside umxtools, which would run on load; "
                                            f"{TRUST_HINT}")
    weights = fileio.safe_child(folder, str(meta.get("weights", "model.pth")), "weights file", meta_path)
    cls = load_class(_spec_near(spec, folder))
    if cls.kind != kind:
        raise ModelError(meta_path, f"says kind {kind!r} but {spec} is a {cls.kind} model")
    args = meta.get("args", {})
    if not isinstance(args, dict):
        raise ModelError(meta_path, "'args' must be a JSON object of constructor arguments")
    try:
        module = cls(**args)
    except TypeError as exc:
        raise ModelError(spec, f"cannot construct with {json.dumps(args, sort_keys=True)} ({exc})") from exc
    except Exception as exc:  # user code: any failure is one line, not a traceback
        raise ModelError(spec, f"constructor failed: {type(exc).__name__}: {str(exc).strip()[:200]}") from exc
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
    model = SeparationModel(kind=kind, targets=chosen, sample_rate=int(rate), nb_channels=int(meta.get("nb_channels", 2)),
                            n_fft=meta.get("n_fft"), n_hop=meta.get("n_hop"), module=module, module_targets=list(available),
                            identity=identity, segmenting=meta.get("segmenting"))
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
