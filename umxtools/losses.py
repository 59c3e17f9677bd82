"""Training losses, by model kind, and open-unmix's early stopping.

Every loss returns one value per target, ``(targets,)``: training sums them (the joint loss of
open-unmix's "Jointly train targets" guide) and records each in the history. Spectrogram models
train on open-unmix's MSE of magnitudes; waveform models on Demucs v2's L1 or a thresholded SDR
(``--loss``). This module imports no torch, so ``umxtools --help`` can read :data:`LOSSES`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# the losses of each kind, the first the default: open-unmix's MSE on magnitudes; L1 (Demucs'
# loss) or SDR on waveforms. The keys are the model kinds (umxtools.models.KINDS)
LOSSES: dict[str, tuple[str, ...]] = {"spectrogram": ("mse",), "waveform": ("l1", "sdr")}
# SDR loss: signal and distortion energies both floored at SDR_TAU * |mixture|^2 (30 dB below the
# mixture; the soft threshold of Wisdom et al.'s thresholded SNR, "Unsupervised sound separation
# using mixture invariant training", 2020), so silent targets and near-perfect estimates neither
# dominate the loss nor give unbounded gradients
SDR_TAU = 1e-3
SDR_EPS = 1e-8


def mse_loss(estimate: torch.Tensor, target: torch.Tensor, mix: torch.Tensor | None = None) -> torch.Tensor:
    """Per-target MSE of magnitudes, ``(targets,)``: open-unmix's ``mse_loss(Y_hat, Y)`` for each.

    ``estimate``, ``target``: ``(batch, targets, channels, bins, frames)``.
    """
    return ((estimate - target) ** 2).mean(dim=(0, 2, 3, 4))


def l1_loss(estimate: torch.Tensor, target: torch.Tensor, mix: torch.Tensor | None = None) -> torch.Tensor:
    """Per-target mean absolute error of waveforms ``(batch, targets, channels, samples)`` (Demucs v2's loss)."""
    return (estimate - target).abs().mean(dim=(0, 2, 3))


def sdr_loss(estimate: torch.Tensor, target: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """Per-target negative SDR in dB, averaged over batch and channels, ``(targets,)``.

    ``SDR = 10 log10((|y|^2 + tau |x|^2) / (|y - y_hat|^2 + tau |x|^2))`` per channel of each
    excerpt, ``x`` the mixture ``(batch, channels, samples)``, ``tau`` = :data:`SDR_TAU`: a soft
    floor 30 dB below the mixture. Without it, an excerpt where the target is silent has an SDR
    of minus infinity whatever the estimate and dominates the mean; with it, such an excerpt
    scores 0 dB for a silent estimate and down to about -30 dB for the mixture.
    """
    floor = SDR_TAU * (mix ** 2).sum(-1)[:, None] + SDR_EPS  # (batch, 1, channels)
    signal = (target ** 2).sum(-1)  # (batch, targets, channels)
    error = ((target - estimate) ** 2).sum(-1)
    sdr = 10 * ((signal + floor) / (error + floor)).log10()
    return -sdr.mean(dim=(0, 2))


LOSS_FUNCTIONS = {"mse": mse_loss, "l1": l1_loss, "sdr": sdr_loss}


def loss_name(kind: str, requested: str) -> str:
    """The loss a model of ``kind`` trains with: the kind's only one (spectrogram models always
    train on the MSE, as open-unmix, whatever ``--loss`` says), else ``requested``."""
    if len(LOSSES[kind]) == 1:
        return LOSSES[kind][0]
    assert requested in LOSSES[kind], requested  # --loss is checked against LOSSES["waveform"]
    return requested


class EarlyStopping:
    """open-unmix's ``utils.EarlyStopping`` (mode min, min_delta 0), with its state saved."""

    def __init__(self, patience: int):
        self.patience, self.best, self.num_bad_epochs = patience, None, 0

    def step(self, metric: float) -> bool:
        """Record an epoch's validation loss; True when training should stop."""
        if self.best is None:
            self.best = metric
            return False
        if math.isnan(metric):
            return True
        # open-unmix: with patience 0 every epoch counts as better (and it stops after the second)
        if self.patience == 0 or metric < self.best:
            self.num_bad_epochs, self.best = 0, metric
        else:
            self.num_bad_epochs += 1
        return self.num_bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"patience": self.patience, "best": self.best, "num_bad_epochs": self.num_bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.num_bad_epochs = state["best"], state["num_bad_epochs"]
