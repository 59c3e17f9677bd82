"""Reading Music-Source-Separation-Training (MSST) artifacts: YAML configs and ``.ckpt`` weights.

MSST (ZFTurbo's trainer, where the community's BS-RoFormer and Mel-Band RoFormer weights are
published) ships a model as a YAML config plus a checkpoint. The config's ``model:`` section is
the constructor's keyword arguments (:class:`umxtools.models.bsroformer.BSRoformer`,
:class:`umxtools.models.melroformer.MelBandRoformer` take MSST's names); ``audio:`` gives the
sample rate and ``chunk_size`` (samples per inference window), ``inference:`` the
``num_overlap`` windows per chunk and batch size, ``training:`` the ``instruments`` and the
optional ``target_instrument`` that names the output of a one-stem model. MSST writes tuples as
``!!python/tuple``, which plain safe YAML loading refuses; they are read here as lists, nothing
else beyond safe YAML is accepted.

A ``.ckpt`` is a state dict, sometimes wrapped in ``{"state_dict": ...}`` and with ``model.`` or
``module.`` key prefixes (Lightning, DataParallel); it is read with ``weights_only`` so a
weights file cannot run code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from umxtools.errors import MsstError, UmxError

# the architectures MSST configs are read for: MSST's model_type -> umxtools' class spec
ARCHITECTURES = {
    "bs_roformer": "umxtools.models.bsroformer:BSRoformer",
    "mel_band_roformer": "umxtools.models.melroformer:MelBandRoformer",
}


class _ConfigLoader(yaml.SafeLoader):
    """Safe YAML plus MSST's ``!!python/tuple`` (read as a list)."""


_ConfigLoader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))


@dataclass
class MsstConfig:
    """What umxtools uses of an MSST YAML config.

    ``model``: constructor keyword arguments; ``targets``: the model's outputs in order (None when
    the config does not say); ``sample_rate``, ``chunk_size`` (samples), ``num_overlap``,
    ``batch_size``: the ``audio:``/``inference:`` values, None when absent.
    """

    path: Path
    model: dict
    targets: list[str] | None = None
    sample_rate: int | None = None
    chunk_size: int | None = None
    num_overlap: int | None = None
    batch_size: int | None = None
    sections: dict = field(default_factory=dict, repr=False)

    @property
    def inference_chunk_size(self) -> int | None:
        """Samples per inference window: ``inference: chunk_size`` when set (MSST prefers it), else ``audio:``'s."""
        inference = self.sections.get("inference")
        chunk = inference.get("chunk_size") if isinstance(inference, dict) else None
        return _int(self.path, inference, "chunk_size") if chunk is not None else self.chunk_size

    def architecture(self) -> str:
        """``bs_roformer`` or ``mel_band_roformer``, from the model section's band arguments."""
        if "num_bands" in self.model:
            return "mel_band_roformer"
        if "freqs_per_bands" in self.model:
            return "bs_roformer"
        raise MsstError(self.path, "model: has neither num_bands (mel_band_roformer) nor freqs_per_bands (bs_roformer); "
                                   "name the architecture")


def read_msst_config(path: str | Path) -> MsstConfig:
    """An MSST YAML config -> :class:`MsstConfig`. Raises :class:`MsstError` naming the file."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_ConfigLoader)  # a SafeLoader subclass
    except OSError as exc:
        raise MsstError(path, f"cannot read ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise MsstError(path, f"not a readable YAML config ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise MsstError(path, "not an MSST config: no 'model:' section")
    bad = [k for k in data["model"] if not isinstance(k, str)]
    if bad:
        raise MsstError(path, f"model: key {bad[0]!r} is not a name")
    audio, inference, training = (data.get(k) or {} for k in ("audio", "inference", "training"))
    model = dict(data["model"])
    targets = _targets(path, training, model.get("num_stems", 1))
    return MsstConfig(path=path, model=model, targets=targets, sample_rate=_int(path, audio, "sample_rate"),
                      chunk_size=_int(path, audio, "chunk_size"), num_overlap=_int(path, inference, "num_overlap"),
                      batch_size=_int(path, inference, "batch_size"), sections=data)


def _int(path: Path, section: dict, key: str) -> int | None:
    value = section.get(key) if isinstance(section, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value <= 0:
        raise MsstError(path, f"{key} must be a positive whole number, has {value!r}")
    return int(value)


def _targets(path: Path, training: dict, num_stems) -> list[str] | None:
    """MSST's outputs: ``[target_instrument]`` when set, else ``instruments``."""
    if not isinstance(training, dict):
        return None
    target = training.get("target_instrument")
    names = [target] if target else training.get("instruments")
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise MsstError(path, f"training: instruments must be a list of names, has {names!r}")
    if len(names) != num_stems:
        raise MsstError(path, f"model: num_stems is {num_stems} but training: gives {len(names)} output(s) ({', '.join(names)})")
    return names


def load_msst_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """An MSST ``.ckpt`` -> its state dict, unwrapped from ``state_dict`` and key prefixes."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for missing, truncated or foreign files
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise MsstError(path, f"not a readable checkpoint ({type(exc).__name__}: {first})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MsstError(path, "not a state dict (a mapping of parameter names to tensors)")
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def build_msst_model(config: str | Path | MsstConfig, checkpoint: str | Path | None = None, architecture: str | None = None,
                     **overrides) -> torch.nn.Module:
    """The model an MSST config describes, with a checkpoint's weights when given, in eval mode.

    ``architecture``: ``bs_roformer`` or ``mel_band_roformer`` (MSST's ``--model_type``); by
    default read off the config (:meth:`MsstConfig.architecture`). ``overrides`` replace model
    arguments (``flash_attn=False``, ...).
    """
    from umxtools.models import load_class  # torch-heavy; this module is imported by the CLI

    config = config if isinstance(config, MsstConfig) else read_msst_config(config)
    architecture = architecture or config.architecture()
    if architecture not in ARCHITECTURES:
        raise MsstError(config.path, f"architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
    cls = load_class(ARCHITECTURES[architecture])
    args = {**config.model, **overrides}
    try:
        model = cls(**args)
    except UmxError as exc:
        raise MsstError(config.path, exc.problem) from exc
    except TypeError as exc:
        raise MsstError(config.path, f"model: does not fit {cls.__name__} ({exc})") from exc
    if checkpoint is not None:
        state = load_msst_checkpoint(checkpoint)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:240]
            raise MsstError(checkpoint, f"does not fit the {architecture} model of {config.path.name} ({detail})") from exc
    return model.eval()
