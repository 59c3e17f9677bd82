"""What separation knows about a loaded model, and the pieces every loader builds it from.

:mod:`umxtools.models.loading` dispatches a source (a model folder, a published name, a demucs or
MSST file) to its loader; each loader (:mod:`umxtools.models.loading` for model folders,
:mod:`umxtools.pretrained`, :mod:`umxtools.models.foreign`) returns a :class:`SeparationModel`
built with the helpers here: weights read without running code (:func:`load_state`), open-unmix's
UMX rebuilt from a state dict's shapes (:func:`umx_from_state`), targets chosen and checked
(:func:`select_targets`, :func:`target_names`) and weight files identified for provenance
(:func:`file_identity`). They sit below every loader, so no loader imports another.

A :class:`SeparationModel` is either one :class:`OpenUnmix` per target, which
:mod:`umxtools.separation` runs with memory bounded independently of the track length, or any
module with the interface of its ``kind``.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from umxtools import fileio
from umxtools.errors import ModelError
from umxtools.models.umx import OpenUnmix


@dataclass
class SeparationModel:
    """What separation needs to know about a model, whatever its files looked like.

    Exactly one of ``umx`` (target -> :class:`OpenUnmix`, in ``targets`` order) and ``module``
    (a spectrogram or waveform model whose outputs are ``module_targets``) is set.
    ``n_fft``/``n_hop`` are the spectrogram models' STFT; ``nb_channels`` is the model's input
    channels (1: open-unmix's mono models see the channel mean of the stereo magnitude).
    """

    kind: str
    targets: list[str]
    sample_rate: int
    nb_channels: int = 2
    n_fft: int | None = None
    n_hop: int | None = None
    umx: dict[str, OpenUnmix] | None = None
    module: torch.nn.Module | None = None
    module_targets: list[str] | None = None
    identity: dict = field(default_factory=dict)
    # how umxtools.segments runs a segment-based waveform model: {"rule": "demucs"} or {"rule": "msst", ...}
    segmenting: dict | None = None

    def to(self, device: torch.device | str) -> "SeparationModel":
        for m in self.modules():
            m.to(device)
        return self

    def modules(self) -> list[torch.nn.Module]:
        return list(self.umx.values()) if self.umx is not None else [self.module]

    @property
    def chunkable(self) -> bool:
        """Whether ``--segment`` makes sense: anything but open-unmix's whole-sequence BLSTM models."""
        return self.umx is None


def file_identity(path: Path) -> dict:
    """Size, modification time and SHA-256 of a file (provenance, not a cache key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    st = path.stat()
    return {"path": str(path.resolve()), "size_bytes": st.st_size, "mtime": st.st_mtime, "sha256": digest.hexdigest()}


def select_targets(available: list[str], targets: list[str] | None, where: Path | str) -> list[str]:
    if targets is None:
        return list(available)
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise ModelError(where, f"has no target {unknown[0]!r} (its targets: {', '.join(available)})")
    if len(set(targets)) != len(targets):
        raise ModelError(where, f"a target is asked for twice: {', '.join(targets)}")
    return list(targets)


def load_state(path: Path) -> dict:
    """A state dict from a ``.pth`` file (``weights_only``: a weights file never runs code).

    A pickle that holds anything but tensors and plain values (an object that would run code
    when loaded) is refused before any of it runs: :class:`ModelError`, one line naming the file.
    """
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols of refused files before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(path, "not a plain weights file (it would run code on load, or it is damaged); nothing in it was run: "
                               "get it again from a source you trust, or save the weights as a state dict "
                               "(torch.save(model.state_dict(), PATH))") from exc
    except Exception as exc:  # torch raises several types for truncated or foreign files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelError(path, f"not a readable weights file ({type(exc).__name__}: {first})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(path, "not a state dict (a mapping of parameter names to tensors)")
    return state


def target_names(names: list, where: Path) -> list[str]:
    """Targets read from a model's JSON file: each must be a plain file name (it names files)."""
    for name in names:
        fileio.check_name(name, "target", where)
    return list(names)


def umx_from_state(state: dict, n_fft: int, where: Path | str) -> OpenUnmix:
    """An :class:`OpenUnmix` whose sizes are read off ``state`` (open-unmix's names), weights loaded.

    ``nb_bins = n_fft // 2 + 1``; ``max_bin`` from ``input_mean``; ``hidden_size`` from ``fc1``;
    ``nb_layers`` and ``unidirectional`` from the LSTM's keys. Keys the model lacks (the
    ``sample_rate``/``stft.window`` buffers of older open-unmix files) are ignored, as open-unmix
    loads with ``strict=False``; a missing or misshapen parameter is an error.
    """
    needed = ("fc1.weight", "input_mean", "fc3.weight", "lstm.weight_ih_l0")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ModelError(where, f"not an Open-Unmix state dict (no {missing[0]!r})")
    max_bin = state["input_mean"].shape[0]
    hidden_size, fc1_in = state["fc1.weight"].shape
    nb_channels = fc1_in // max_bin
    nb_layers = sum(1 for k in state if k.startswith("lstm.weight_ih_l") and not k.endswith("_reverse"))
    unidirectional = "lstm.weight_ih_l0_reverse" not in state
    nb_bins = n_fft // 2 + 1
    if state["fc3.weight"].shape[0] != nb_bins * nb_channels:
        raise ModelError(where, f"estimates {state['fc3.weight'].shape[0] // max(1, nb_channels)} bins, n_fft {n_fft} needs {nb_bins}")
    model = OpenUnmix(nb_bins=nb_bins, nb_channels=nb_channels, hidden_size=hidden_size, nb_layers=nb_layers,
                      unidirectional=unidirectional, max_bin=max_bin)
    have = model.state_dict()
    absent = [k for k in have if k not in state]
    if absent:
        raise ModelError(where, f"lacks {absent[0]!r} (and {len(absent) - 1} more)" if len(absent) > 1 else f"lacks {absent[0]!r}")
    wrong = [k for k in have if state[k].shape != have[k].shape]
    if wrong:
        raise ModelError(where, f"{wrong[0]!r} has shape {tuple(state[wrong[0]].shape)}, expected {tuple(have[wrong[0]].shape)}")
    model.load_state_dict({k: state[k] for k in have})
    return model.freeze()


def umx_args(model: OpenUnmix) -> dict:
    """The constructor arguments of a built :class:`OpenUnmix` (for provenance)."""
    return {"nb_bins": model.nb_output_bins, "nb_channels": model.nb_channels, "hidden_size": model.hidden_size,
            "nb_layers": model.lstm.num_layers, "unidirectional": not model.lstm.bidirectional, "max_bin": model.nb_bins}
