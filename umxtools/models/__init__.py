"""Separation models, one file per architecture, and the registry ``umxtools train --model`` reads.

A model class is named by a *spec*, ``MODULE:CLASS`` (``umxtools.models.joint:OpenUnmixJoint``)
or ``path/to/file.py:CLASS``; the registry gives the built-in ones short names. Every class
trained through :mod:`umxtools.training` has a ``kind`` class attribute, ``"spectrogram"`` or
``"waveform"`` (docs/model-format.md gives each kind's input and output shapes).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from umxtools.errors import DatasetError, ModelError

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
# the training loss of each kind: open-unmix's MSE on magnitudes; L1 (Demucs' loss) or SDR on waveforms
LOSSES: dict[str, tuple[str, ...]] = {"spectrogram": ("mse",), "waveform": ("l1", "sdr")}
KINDS = tuple(LOSSES)

# the classes are imported on first use: this registry serves `umxtools --help`, which should
# not pay torch's import
_CLASSES = {"OpenUnmix": "umxtools.models.umx", "OpenUnmixJoint": "umxtools.models.joint", "Demucs": "umxtools.models.waveform",
            "BSRoformer": "umxtools.models.bsroformer", "MelBandRoformer": "umxtools.models.melroformer"}

__all__ = ["JOINT", "KINDS", "LOSSES", "MODELS", "BSRoformer", "Demucs", "MelBandRoformer", "ModelError", "OpenUnmix", "OpenUnmixJoint",
           "load_class", "spec_of"]


def __getattr__(name: str):
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_class(spec: str) -> type:
    """The class a spec names; a ``.py`` path is imported from that file under a private name.

    The class must have a ``kind`` attribute in :data:`KINDS`: a model that does not say what it
    consumes is refused rather than guessed.
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
    kind = getattr(cls, "kind", None)
    if kind not in KINDS:
        raise ModelError(spec, f"the class needs a 'kind' attribute, 'spectrogram' or 'waveform' (has {kind!r}); "
                               "see examples/template_model.py")
    return cls


def spec_of(spec: str) -> str:
    """A spec that still names the class from another working directory (files made absolute)."""
    module_name, class_name = spec.rsplit(":", 1)
    if module_name.endswith(".py"):
        module_name = str(Path(module_name).resolve())
    return f"{module_name}:{class_name}"
