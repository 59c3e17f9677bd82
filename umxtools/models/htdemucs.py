"""HTDemucs (Rouard, Massa, Défossez, "Hybrid Transformers for Music Source Separation", ICASSP 2023),
with the ``demucs`` package's own ``demucs.htdemucs.HTDemucs`` doing the work.

umxtools adds the model-family contract around it (docs/model-format.md): constructor arguments
in umxtools' names (``targets`` -> demucs's ``sources``, ``nb_channels`` -> ``audio_channels``,
``sample_rate`` -> ``samplerate``), ``kind = "waveform"``, and a ``forward`` that takes any
length. Every other HTDemucs argument goes in ``demucs_args`` (demucs's names), so a model.json
rebuilds it and ``umxtools train --model htdemucs --model-arg 'demucs_args={"channels": 8}'``
sets it. The state dict is demucs's under a ``demucs.`` prefix.

HTDemucs is trained on excerpts of ``segment`` seconds and, in eval mode, only accepts inputs up
to that length (it pads shorter ones itself). ``forward`` therefore runs longer inputs with
demucs's ``apply_model`` rule (:class:`umxtools.segments.DemucsPlan`, no shifts, overlap 0.25),
which is also what ``umxtools separate`` does, streamed. In training mode demucs sets
``segment`` to the length of each batch; umxtools keeps the constructor's value instead, so the
model.json stays true: train with ``--seq-dur`` equal to ``segment`` as demucs does.

Shapes: input ``(batch, channels, samples)``; output ``(batch, targets, channels, samples)``.
"""

from __future__ import annotations

import inspect
from fractions import Fraction

import torch
from torch import nn

from umxtools.models import ModelError
# the demucs rule lives in segments (built on no model); re-exported here where it was first defined
from umxtools.segments import OVERLAP, as_fraction, demucs_plan, run_whole  # noqa: F401

INSTALL = "pip install 'umxtools[htdemucs]' (demucs>=4.1)"
# HTDemucs arguments umxtools sets under its own names
_OWN = {"sources": "targets", "audio_channels": "nb_channels", "samplerate": "sample_rate", "segment": "segment"}


def demucs_class() -> type:
    """``demucs.htdemucs.HTDemucs``, or a one-line :class:`ModelError` saying how to install it."""
    try:
        from demucs.htdemucs import HTDemucs as DemucsHT
    except ImportError as exc:
        raise ModelError("demucs", f"the demucs package is not importable ({exc}); install it: {INSTALL}") from exc
    return DemucsHT


def fraction_text(value: Fraction) -> int | str:
    """How a segment is written in model.json: an integer, or ``"num/den"`` (exact, JSON-safe)."""
    return int(value) if value.denominator == 1 else str(value)


class HTDemucs(nn.Module):
    """demucs's HTDemucs under umxtools' model contract.

    Args:
        targets: source names, in output order (demucs's ``sources``).
        nb_channels: audio channels (``audio_channels``).
        sample_rate: Hz (``samplerate``).
        segment: seconds per training excerpt and per inference segment; a number or ``"num/den"``.
        demucs_args: every other ``demucs.htdemucs.HTDemucs`` keyword argument (``channels``,
            ``depth``, ``nfft``, ``t_layers``, ...), demucs's defaults for the rest.
    """

    kind = "waveform"
    segmenting = {"rule": "demucs"}  # how umxtools separate runs it (umxtools.segments)

    def __init__(self, targets: list[str], nb_channels: int = 2, sample_rate: int = 44100, segment: float | str = 10,
                 demucs_args: dict | None = None):
        super().__init__()
        cls = demucs_class()
        demucs_args = dict(demucs_args or {})
        params = inspect.signature(cls).parameters
        for key in demucs_args:
            if key in _OWN:
                raise ModelError("htdemucs", f"demucs_args {key!r}: give it as {_OWN[key]!r}")
            if key not in params:
                raise ModelError("htdemucs", f"demucs_args {key!r} is not an argument of demucs.htdemucs.HTDemucs")
        self.targets = list(targets)
        self.nb_channels, self.sample_rate = int(nb_channels), int(sample_rate)
        self.demucs = cls(sources=self.targets, audio_channels=self.nb_channels, samplerate=self.sample_rate,
                          segment=as_fraction(segment), **demucs_args)
        self._segment = self.demucs.segment

    @classmethod
    def adopt(cls, model: nn.Module) -> HTDemucs:
        """A wrapper around an existing ``demucs.htdemucs.HTDemucs`` (weights kept, not copied)."""
        wrapper = cls.__new__(cls)
        nn.Module.__init__(wrapper)
        wrapper.targets, wrapper.nb_channels, wrapper.sample_rate = list(model.sources), int(model.audio_channels), int(model.samplerate)
        wrapper.demucs = model
        wrapper._segment = model.segment
        return wrapper

    def constructor_args(self) -> dict:
        """The arguments that rebuild this model (what model.json records)."""
        _, kwargs = getattr(self.demucs, "_init_args_kwargs", ((), {}))
        rest = {k: v for k, v in kwargs.items() if k not in _OWN}
        return {"targets": self.targets, "nb_channels": self.nb_channels, "sample_rate": self.sample_rate,
                "segment": fraction_text(Fraction(self.demucs.segment)), "demucs_args": rest}

    @property
    def segment_length(self) -> int:
        """Samples per segment, as apply_model computes it: ``int(samplerate * segment)``."""
        return int(self.demucs.samplerate * self.demucs.segment)

    def members(self) -> list[tuple[nn.Module, list[float] | None]]:
        """The models apply_model runs and their source weights (none: a model alone)."""
        return [(self.demucs, None)]

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """``(batch, channels, samples)`` -> ``(batch, targets, channels, samples)``."""
        if self.training:
            try:
                return self.demucs(mix)
            finally:
                self.demucs.segment = self._segment  # demucs would keep the batch's length as its segment
        return _apply(self, mix)


class HTDemucsBag(nn.Module):
    """A demucs bag of HTDemucs models (``htdemucs_ft``: one fine-tuned model per source), with
    the bag's per-model source weights, run as demucs's ``apply_model`` runs a ``BagOfModels``.

    Args:
        targets, nb_channels, sample_rate: shared by every member.
        members: each member's :class:`HTDemucs` arguments without the shared ones
            (``segment``, ``demucs_args``).
        weights: one list of per-source weights per member (default: all ones).
    """

    kind = "waveform"
    segmenting = {"rule": "demucs"}  # as HTDemucs: demucs's apply_model, each member in turn

    def __init__(self, targets: list[str], members: list[dict], nb_channels: int = 2, sample_rate: int = 44100,
                 weights: list[list[float]] | None = None):
        super().__init__()
        if not members:
            raise ModelError("htdemucs bag", "needs at least one member")
        self.targets, self.nb_channels, self.sample_rate = list(targets), int(nb_channels), int(sample_rate)
        self.models = nn.ModuleList(HTDemucs(self.targets, self.nb_channels, self.sample_rate, **m) for m in members)
        self.weights = self._check_weights(weights)

    def _check_weights(self, weights) -> list[list[float]]:
        weights = [[1.0] * len(self.targets) for _ in self.models] if weights is None else [list(map(float, w)) for w in weights]
        if len(weights) != len(self.models) or any(len(w) != len(self.targets) for w in weights):
            raise ModelError("htdemucs bag", f"weights must be {len(self.models)} lists of {len(self.targets)} numbers")
        return weights

    @classmethod
    def adopt(cls, models: list[nn.Module], weights: list[list[float]] | None) -> HTDemucsBag:
        """A bag around existing demucs HTDemucs models (as ``demucs.apply.BagOfModels`` holds them)."""
        first = models[0]
        bag = cls.__new__(cls)
        nn.Module.__init__(bag)
        bag.targets, bag.nb_channels, bag.sample_rate = list(first.sources), int(first.audio_channels), int(first.samplerate)
        bag.models = nn.ModuleList(HTDemucs.adopt(m) for m in models)
        bag.weights = bag._check_weights(weights)
        return bag

    def constructor_args(self) -> dict:
        members = []
        for m in self.models:
            args = m.constructor_args()
            members.append({"segment": args["segment"], "demucs_args": args["demucs_args"]})
        return {"targets": self.targets, "nb_channels": self.nb_channels, "sample_rate": self.sample_rate,
                "members": members, "weights": self.weights}

    def members(self) -> list[tuple[nn.Module, list[float] | None]]:
        return [(m.demucs, w) for m, w in zip(self.models, self.weights)]

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """``(batch, channels, samples)`` -> ``(batch, targets, channels, samples)``: the members'
        outputs weighted per source, divided by each source's total weight."""
        if not self.training:
            return _apply(self, mix)
        totals = torch.tensor(self.weights, device=mix.device).sum(0)  # (targets,)
        out = sum(m(mix) * torch.tensor(w, device=mix.device)[:, None, None] for m, w in zip(self.models, self.weights))
        return out / totals[:, None, None]


def _apply(module: HTDemucs | HTDemucsBag, mix: torch.Tensor) -> torch.Tensor:
    """Eval-mode forward of any length: each example through demucs's rule, no shifts."""
    plan = demucs_plan(module)
    return torch.stack([run_whole(plan, x) for x in mix])
