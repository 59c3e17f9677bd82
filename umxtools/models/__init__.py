"""Separation models, one file per architecture, and the registry ``umxtools train --model`` reads.

A model class is named by a *spec*, ``MODULE:CLASS`` (``umxtools.models.joint:OpenUnmixJoint``)
or ``path/to/file.py:CLASS``; the registry gives the built-in ones short names. Built-in and user
classes keep one contract (examples/template_model.py states it, :func:`check_contract` checks it):

- ``kind``: ``"spectrogram"`` or ``"waveform"`` (docs/model-format.md gives each kind's input and
  output shapes);
- the constructor: it is given those of :data:`OFFERED_ARGS` and :data:`STATISTICS_ARGS` it names
  (:func:`accepted_args`), plus the ``--model-arg`` values;
- ``segmenting`` (optional, default None): how ``umxtools separate`` runs it, a rule of
  :mod:`umxtools.segments` (:data:`SEGMENTING_RULES`); None runs it on the whole track, or on
  cross-faded ``--segment`` pieces.

A new family is one module under ``umxtools/models/`` whose class keeps the contract, plus one
line in :data:`MODELS`.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from umxtools.errors import DatasetError, ModelError
from umxtools.losses import LOSSES

# umxtools train --model NAME; anything else given to --model is read as a MODULE:CLASS spec
MODELS: dict[str, str] = {
    "umx": "umxtools.models.umx:OpenUnmix",
    "waveform": "umxtools.models.waveform:Demucs",
    "bsroformer": "umxtools.models.bsroformer:BSRoformer",
    "melroformer": "umxtools.models.melroformer:MelBandRoformer",
    "htdemucs": "umxtools.models.htdemucs:HTDemucs",
}
# demucs's published names whose models are all HTDemucs (umxtools.models.foreign loads them)
DEMUCS_NAMES = ("htdemucs", "htdemucs_ft", "htdemucs_6s")
# what --joint trains (one UMX per target)
JOINT = "umxtools.models.joint:OpenUnmixJoint"
# the model kinds are those umxtools.losses has losses for
KINDS = tuple(LOSSES)
# the constructor arguments umxtools offers every model class (facts of the cache and the flags)
OFFERED_ARGS = ("targets", "nb_bins", "nb_channels", "sample_rate", "n_fft", "n_hop", "max_bin")
# offered too, but not recorded in model.json: the mixture statistics, (nb_bins,) arrays
STATISTICS_ARGS = ("input_mean", "input_scale")
# the rules a class's `segmenting` may name (umxtools.segments.plan_for runs them)
SEGMENTING_RULES = ("demucs", "msst")

# the classes are imported on first use: this registry serves `umxtools --help`, which should
# not pay torch's import
_CLASSES = {"OpenUnmix": "umxtools.models.umx", "OpenUnmixJoint": "umxtools.models.joint", "Demucs": "umxtools.models.waveform",
            "BSRoformer": "umxtools.models.bsroformer", "MelBandRoformer": "umxtools.models.melroformer"}

__all__ = ["JOINT", "KINDS", "LOSSES", "MODELS", "OFFERED_ARGS", "SEGMENTING_RULES", "STATISTICS_ARGS", "BSRoformer", "Demucs",
           "MelBandRoformer", "ModelError", "OpenUnmix", "OpenUnmixJoint", "accepted_args", "check_contract", "load_class", "spec_of"]


def __getattr__(name: str):
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_class(spec: str) -> type:
    """The class a spec names; a ``.py`` path is imported from that file under a private name.

    Built-in names of :data:`MODELS` go through here as a user's spec does; the class must keep
    the contract (:func:`check_contract`): a model that does not say what it consumes is refused
    rather than guessed.
    """
    if ":" not in spec:
        raise ModelError(spec, "not MODULE:CLASS (or path/to/file.py:CLASS)")
    module_name, class_name = spec.rsplit(":", 1)
    # the same importer as user dataset classes (private module names for files); its errors
    # name the module, only their class changes
    from umxtools.datasets import _import_user_module

    try:
        module = _import_user_module(module_name)
    except DatasetError as exc:
        raise ModelError(exc.path, exc.problem) from exc
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ModelError(module_name, f"has no class {class_name!r}")
    check_contract(cls, spec)
    return cls


def check_contract(cls: type, where: str) -> None:
    """Raise :class:`ModelError` (naming ``where``) unless ``cls`` keeps the model contract.

    Checked without building the model: ``kind`` in :data:`KINDS`, a constructor whose signature
    can be read (what it is offered depends on it), ``segmenting`` None or a dict naming one of
    :data:`SEGMENTING_RULES`.
    """
    kind = getattr(cls, "kind", None)
    if kind not in KINDS:
        raise ModelError(where, f"the class needs a 'kind' attribute, 'spectrogram' or 'waveform' (has {kind!r}); "
                                "see examples/template_model.py")
    try:
        inspect.signature(cls)
    except (TypeError, ValueError) as exc:
        raise ModelError(where, f"the constructor's arguments cannot be read ({exc})") from exc
    segmenting = getattr(cls, "segmenting", None)
    if segmenting is not None and (not isinstance(segmenting, dict) or segmenting.get("rule") not in SEGMENTING_RULES):
        raise ModelError(where, f"'segmenting' must be None or a dict whose 'rule' is one of {', '.join(SEGMENTING_RULES)} "
                                f"(has {segmenting!r})")


def accepted_args(cls: type) -> tuple[str, ...]:
    """What umxtools passes the constructor of ``cls``, in this order: those of :data:`OFFERED_ARGS`
    it names (all of them when it takes ``**kwargs``), then those of :data:`STATISTICS_ARGS` it
    names (only by name: they are not JSON and are not recorded)."""
    params = inspect.signature(cls).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return (*(k for k in OFFERED_ARGS if var_kw or k in params), *(k for k in STATISTICS_ARGS if k in params))


def spec_of(spec: str) -> str:
    """A spec that still names the class from another working directory (files made absolute)."""
    module_name, class_name = spec.rsplit(":", 1)
    if module_name.endswith(".py"):
        module_name = str(Path(module_name).resolve())
    return f"{module_name}:{class_name}"
