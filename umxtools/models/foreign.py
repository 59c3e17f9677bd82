"""Other projects' published model files as umxtools models: demucs ``.th`` packages and names,
MSST ``.ckpt`` + YAML, and writing any of them as a model folder (docs/model-format.md).

demucs (4.1.0) stores a model as a *package*, a pickled dict ``{"klass", "args", "kwargs",
"state", ...}`` whose ``klass`` is the model class itself (``demucs/states.py``). Plain
``torch.load(weights_only=True)`` refuses it; demucs loads it with ``weights_only=False``, which
would run any code a file names. Here it is read with ``weights_only=True`` plus an allow-list
of exactly two globals, ``demucs.htdemucs.HTDemucs`` (the class object, never called while
unpickling) and ``fractions.Fraction`` (HTDemucs's ``segment``): anything else in the file is
refused before it runs. Quantized packages (``*_q`` models, diffq) are refused.

demucs's names (``htdemucs``, ``htdemucs_ft``, ``htdemucs_6s``) resolve through demucs's own
repository (``demucs/remote/files.txt`` and the bag YAMLs, ``demucs.repo.BagOnlyRepo`` and
``AnyModelRepo``, so bag weights and segments are demucs's), with the files fetched into
torch.hub's cache where demucs would keep them, checked against the SHA-256 prefix in their
names, and read as above. Without network the error names every missing URL and the folder to
put the files in.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from fractions import Fraction
from pathlib import Path

import torch

from umxtools import fileio
from umxtools.errors import UmxError
from umxtools.models import DEMUCS_NAMES, ModelError
from umxtools.models.htdemucs import HTDemucs, HTDemucsBag, demucs_class

__all__ = ["DEMUCS_NAMES", "demucs_separation_model", "load_demucs_file", "load_demucs_name", "msst_separation_model",
           "read_demucs_package", "write_model_folder"]


# --- demucs ----------------------------------------------------------------------------------------


def read_demucs_package(path: str | Path) -> dict:
    """A demucs ``.th`` package, unpickled with only HTDemucs and Fraction allowed (see module doc)."""
    path = Path(path)
    cls = demucs_class()
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([cls, Fraction]):
            warnings.simplefilter("ignore")
            package = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError(path, "no such file") from exc
    except Exception as exc:  # torch raises several types for foreign or damaged files
        detail = " ".join(str(exc).split())
        if "Unsupported global" in detail or "GLOBAL" in detail:
            name = detail.split("GLOBAL", 1)[1].split()[0] if "GLOBAL" in detail else "?"
            raise ModelError(path, f"names {name}, which umxtools does not load (only demucs HTDemucs packages); "
                                   "nothing in it was run") from exc
        raise ModelError(path, f"not a readable demucs package ({type(exc).__name__}: {detail[:160]})") from exc
    if not isinstance(package, dict) or not {"klass", "kwargs", "state"} <= set(package):
        raise ModelError(path, "not a demucs package (a dict with klass, args, kwargs, state)")
    if package["klass"] is not cls:
        raise ModelError(path, f"holds a {package['klass']!r}; umxtools loads demucs HTDemucs models only")
    state = package["state"]
    if not isinstance(state, dict) or state.get("__quantized"):
        raise ModelError(path, "holds quantized (diffq) weights, which umxtools does not load; use the unquantized model")
    return package


def demucs_from_package(package: dict, where: str | Path) -> torch.nn.Module:
    """The ``demucs.htdemucs.HTDemucs`` a package describes, weights loaded (float32), eval mode.

    As demucs's ``load_model(strict=False)``: keyword arguments the class no longer has are
    dropped with a warning; positional ones are named from the signature.
    """
    cls = package["klass"]
    params = list(inspect.signature(cls).parameters)
    kwargs = dict(zip(params, package.get("args") or ()))
    kwargs.update(package["kwargs"])
    for key in [k for k in kwargs if k not in params]:
        warnings.warn(f"{where}: dropping HTDemucs argument {key!r}, which demucs no longer has", stacklevel=2)
        del kwargs[key]
    try:
        model = cls(**kwargs)
        model.load_state_dict(package["state"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(where, f"does not build an HTDemucs ({' '.join(str(exc).split())[:200]})") from exc
    return model.eval()


def load_demucs_file(path: str | Path) -> HTDemucs:
    """A local demucs ``.th`` -> :class:`HTDemucs` (eval mode)."""
    return HTDemucs.adopt(demucs_from_package(read_demucs_package(path), path)).eval()


def _sha_prefix_ok(path: Path) -> bool:
    """Whether ``NAME-<hex>.th`` has a SHA-256 starting with ``<hex>`` (torch.hub's and demucs's check)."""
    stem = path.stem
    if "-" not in stem:
        return True
    expected = stem.rsplit("-", 1)[1]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest().startswith(expected)


def load_demucs_name(name: str) -> HTDemucs | HTDemucsBag:
    """A demucs published name (:data:`DEMUCS_NAMES`) -> :class:`HTDemucs` or :class:`HTDemucsBag`."""
    from demucs.apply import BagOfModels
    from demucs.pretrained import REMOTE_ROOT, _parse_remote_files
    from demucs.repo import AnyModelRepo, BagOnlyRepo, ModelOnlyRepo

    from umxtools import pretrained

    urls = _parse_remote_files(REMOTE_ROOT / "files.txt")

    class CachedRepo(ModelOnlyRepo):
        """demucs's RemoteRepo, reading torch.hub's cache with the allow-listed loader."""

        def has_model(self, sig: str) -> bool:
            return sig in urls

        def get_model(self, sig: str):
            path = pretrained.hub_file(urls[sig])
            if not _sha_prefix_ok(path):
                raise ModelError(path, f"does not match the checksum in its name; delete it and fetch {urls[sig]} again")
            return demucs_from_package(read_demucs_package(path), path)

        def list_model(self):
            return urls

    models = CachedRepo()
    repo = AnyModelRepo(models, BagOnlyRepo(REMOTE_ROOT, models))
    if name not in DEMUCS_NAMES or not repo.has_model(name):
        raise ModelError(name, f"not a demucs HTDemucs model name ({', '.join(DEMUCS_NAMES)})")
    _fetch(name, _signatures(name, urls), urls)
    got = repo.get_model(name)
    if isinstance(got, BagOfModels):
        if len(got.models) == 1 and all(w == 1 for w in got.weights[0]):
            return HTDemucs.adopt(got.models[0]).eval()
        return HTDemucsBag.adopt(list(got.models), got.weights).eval()
    return HTDemucs.adopt(got).eval()


def _signatures(name: str, urls: dict[str, str]) -> list[str]:
    """The model files a name needs: its bag YAML's ``models``, or itself."""
    import yaml
    from demucs.pretrained import REMOTE_ROOT

    bag = REMOTE_ROOT / f"{name}.yaml"
    if bag.is_file():
        return list(yaml.safe_load(bag.read_text())["models"])
    return [name]


def _fetch(name: str, signatures: list[str], urls: dict[str, str]) -> None:
    """Download the missing files of ``signatures`` into torch.hub's cache; one line if that fails."""
    from umxtools import pretrained

    missing = [urls[s] for s in signatures if not pretrained.hub_file(urls[s]).exists()]
    for i, url in enumerate(missing):
        path = pretrained.hub_file(url)
        try:
            pretrained.download(name, url, path)
        except ModelError as exc:
            folder = path.parent
            raise ModelError(name, f"cannot download {url} ({exc.problem.split('(', 1)[-1].split(')')[0]}); "
                                   f"without network, put {' and '.join(missing[i:])} in {folder}") from exc
        warnings.warn(f"{name}: downloaded {url} to {path}", stacklevel=2)


# --- as a SeparationModel --------------------------------------------------------------------------


def demucs_separation_model(source: str | Path, targets: list[str] | None = None, identity: bool = True):
    """A demucs ``.th`` file or name -> :class:`~umxtools.models.separation_model.SeparationModel`."""
    from umxtools.models.separation_model import SeparationModel, file_identity, select_targets

    path = Path(source).expanduser()
    module = load_demucs_file(path) if path.suffix == ".th" and path.exists() else load_demucs_name(str(source))
    chosen = select_targets(module.targets, targets, source)
    spec = f"umxtools.models.htdemucs:{type(module).__name__}"
    ident = {"source": str(path.resolve()) if path.exists() else str(source), "format": "demucs", "class": spec,
             "args": module.constructor_args()}
    if identity and path.exists():
        ident["files"] = {path.name: file_identity(path)}
    for p in module.parameters():
        p.requires_grad = False
    return SeparationModel(kind="waveform", targets=chosen, sample_rate=module.sample_rate, nb_channels=module.nb_channels,
                           module=module, module_targets=list(module.targets), identity=ident)


def msst_separation_model(checkpoint: str | Path, config: str | Path, targets: list[str] | None = None, identity: bool = True):
    """An MSST ``.ckpt`` and its YAML -> :class:`~umxtools.models.separation_model.SeparationModel`, separated
    with MSST's ``demix`` rule and the config's ``chunk_size``/``num_overlap``/``batch_size``."""
    from umxtools.models.separation_model import SeparationModel, file_identity, select_targets
    from umxtools.msst import ARCHITECTURES, build_msst_model, read_msst_config

    conf = read_msst_config(config)
    architecture = conf.architecture()
    module = build_msst_model(conf, checkpoint)
    for p in module.parameters():
        p.requires_grad = False
    if conf.sample_rate is None or conf.chunk_size is None:
        raise ModelError(config, "needs audio: sample_rate and chunk_size (MSST's inference reads them)")
    available = conf.targets or [f"stem{i}" for i in range(module.num_stems)]
    chosen = select_targets(available, targets, config)
    segmenting = {"rule": "msst", "chunk_size": conf.inference_chunk_size, "num_overlap": conf.num_overlap or 4, "batch_size": conf.batch_size or 1}
    ident = {"source": str(Path(checkpoint).resolve()), "format": "msst", "class": ARCHITECTURES[architecture],
             "args": dict(conf.model), "config": str(Path(config).resolve()), "segmenting": segmenting}
    if identity:
        ident["files"] = {Path(p).name: file_identity(Path(p)) for p in (checkpoint, config)}
    return SeparationModel(kind="waveform", targets=chosen, sample_rate=conf.sample_rate, nb_channels=2 if module.stereo else 1,
                           module=module, module_targets=list(available), identity=ident, segmenting=segmenting)


# --- as a model folder -----------------------------------------------------------------------------


def write_model_folder(model, folder: str | Path, command: list[str] | None = None) -> Path:
    """A loaded demucs or MSST :class:`SeparationModel` -> a model folder (model.json + model.pth)
    that ``separate``, ``eval`` and ``report`` load like any other, separated with the same rule."""
    from umxtools import model_folder

    folder = Path(folder)
    ident = model.identity
    if ident.get("format") not in ("demucs", "msst"):
        raise UmxError(folder, "only demucs and MSST models are written this way; umxtools train writes its own folders")
    more = {"imported_from": {k: ident[k] for k in ("source", "format", "config", "files") if k in ident}}
    spec = model_folder.ModelSpec(ident["class"], ident["args"], "waveform")
    meta = model_folder.model_json(spec, model.module_targets, "model.pth", model.sample_rate, model.nb_channels, command, **more)
    if model.segmenting is not None:
        meta["segmenting"] = model.segmenting
    state = {k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()}
    with fileio.atomic(folder / "model.pth") as tmp:
        torch.save(state, tmp)
    model_folder.write_json(folder / model_folder.MODEL_JSON, meta)
    return folder
