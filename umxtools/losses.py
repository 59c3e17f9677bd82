"""Training losses, by model kind, and open-unmix's early stopping.

Every loss returns one value per target, ``(targets,)``: training sums them (the joint loss of
open-unmix's "Jointly train targets" guide) and records each in the history. Spectrogram models
train on open-unmix's MSE of magnitudes; waveform models on a ``+``-joined sum of named terms
(``--loss l1+mrstft``): Demucs v2's L1, the MSE, a thresholded SDR, a multi-resolution STFT loss and MSST's complex STFT L1.
This module imports no torch at import time, so ``umxtools --help`` can read :data:`LOSSES`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# the loss terms of each kind, the first the default: open-unmix's MSE on magnitudes; on
# waveforms any "+"-joined sum of these terms. The keys are the model kinds (umxtools.models.KINDS)
LOSSES: dict[str, tuple[str, ...]] = {"spectrogram": ("mse",), "waveform": ("l1", "sdr", "mse", "mrstft", "cstft")}
# SDR loss: signal and distortion energies both floored at SDR_TAU * |mixture|^2 (30 dB below the
# mixture; the soft threshold of Wisdom et al.'s thresholded SNR, "Unsupervised sound separation
# using mixture invariant training", 2020), so silent targets and near-perfect estimates neither
# dominate the loss nor give unbounded gradients
SDR_TAU = 1e-3
SDR_EPS = 1e-8
# multi-resolution STFT loss: FFT sizes (Hann windows of the same length, hop a quarter of it)
# and the floor of the power spectrum (auraloss' eps: magnitudes are at least 1e-4)
MRSTFT_SIZES = (4096, 2048, 1024, 512, 256)
MRSTFT_EPS = 1e-8
# complex multi-resolution STFT L1, MSST's RoFormer term (its BSRoformer/MelBandRoformer defaults):
# Hann windows of these lengths, FFT size max(window, CSTFT_MIN_FFT), hop CSTFT_HOP, unnormalised
CSTFT_SIZES = (4096, 2048, 1024, 512, 256)
CSTFT_MIN_FFT = 2048  # MSST's stft_n_fft
CSTFT_HOP = 147


def _but_targets(x: torch.Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def mse_loss(estimate: torch.Tensor, target: torch.Tensor, mix: torch.Tensor | None = None) -> torch.Tensor:
    """Per-target MSE, ``(targets,)``: open-unmix's ``mse_loss(Y_hat, Y)`` for each.

    ``estimate``, ``target``: magnitudes ``(batch, targets, channels, bins, frames)`` or waveforms
    ``(batch, targets, channels, samples)``.
    """
    return ((estimate - target) ** 2).mean(dim=_but_targets(estimate))


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


def _signals_by_target(estimate: torch.Tensor, target: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The number of targets and both ``(batch, targets, channels, samples)`` waveforms as rows
    ``(targets * batch * channels, samples)``, target-major: the STFT losses' input."""
    nb_samples = estimate.shape[-1]
    return (estimate.shape[1], estimate.transpose(0, 1).reshape(-1, nb_samples),
            target.transpose(0, 1).reshape(-1, nb_samples))


def mrstft_loss(estimate: torch.Tensor, target: torch.Tensor, mix: torch.Tensor | None = None) -> torch.Tensor:
    """Per-target multi-resolution STFT loss of waveforms ``(batch, targets, channels, samples)``,
    ``(targets,)``.

    The loss of Yamamoto et al., "Parallel WaveGAN", ICASSP 2020 (eq. 4-6), as auraloss's
    ``MultiResolutionSTFTLoss`` computes it: for each FFT size ``n`` of :data:`MRSTFT_SIZES`
    (Hann window of length ``n``, hop ``n // 4``, centred with reflection padding), with
    ``|S|`` = ``sqrt(max(|STFT|^2, 1e-8))`` of the target and ``|S^|`` of the estimate over all
    of a target's excerpts and channels,

    ``L_n = || |S| - |S^| ||_F / || |S| ||_F + mean(| ln|S| - ln|S^| |)``

    (spectral convergence plus log-magnitude L1), and the loss is the mean of ``L_n`` over the
    sizes. Sizes whose half exceeds the excerpt (reflection padding needs fewer samples than the
    excerpt) are left out. For ``estimate = a * target`` (no bin under the floor) it is
    ``|1 - a| + |ln a|``.
    """
    import torch

    nb_samples = estimate.shape[-1]
    sizes = [n for n in MRSTFT_SIZES if n // 2 < nb_samples]
    assert sizes, f"excerpts of {nb_samples} samples are too short for the multi-resolution STFT loss"
    k, est, ref = _signals_by_target(estimate, target)
    total = estimate.new_zeros(k)
    for n in sizes:
        window = torch.hann_window(n, device=estimate.device, dtype=estimate.dtype)

        def magnitude(x: torch.Tensor) -> torch.Tensor:
            spec = torch.stft(x, n, hop_length=n // 4, window=window, center=True, pad_mode="reflect", return_complex=True)
            return (spec.real ** 2 + spec.imag ** 2).clamp(min=MRSTFT_EPS).sqrt().reshape(k, -1)  # (targets, everything)

        m_est, m_ref = magnitude(est), magnitude(ref)
        convergence = (m_ref - m_est).norm(dim=1) / m_ref.norm(dim=1)
        log_l1 = (m_ref.log() - m_est.log()).abs().mean(dim=1)
        total = total + convergence + log_l1
    return total / len(sizes)


def cstft_loss(estimate: torch.Tensor, target: torch.Tensor, mix: torch.Tensor | None = None) -> torch.Tensor:
    """Per-target multi-resolution complex STFT L1 of waveforms ``(batch, targets, channels,
    samples)``, ``(targets,)``: MSST's RoFormer term.

    For each window length ``w`` of :data:`CSTFT_SIZES`: the STFT (Hann window of length ``w``,
    FFT size ``max(w, 2048)``, hop 147, centred with reflection padding, unnormalised) of estimate
    and target, and the mean modulus of their complex difference over a target's excerpts,
    channels, bins and frames; the term is the sum over the sizes. ``l1+cstft`` of one target is
    the loss MSST's ``BSRoformer``/``MelBandRoformer`` return for a target (its defaults:
    ``multi_stft_resolution_loss_weight`` 1, ``stft_n_fft`` 2048); with several targets the
    targets' losses are summed where MSST averages them.
    """
    import torch

    k, est, ref = _signals_by_target(estimate, target)
    total = estimate.new_zeros(k)
    for w in CSTFT_SIZES:
        window = torch.hann_window(w, device=estimate.device, dtype=estimate.dtype)
        settings = dict(n_fft=max(w, CSTFT_MIN_FFT), hop_length=CSTFT_HOP, win_length=w, window=window, return_complex=True)
        diff = torch.stft(est, **settings) - torch.stft(ref, **settings)
        total = total + diff.abs().reshape(k, -1).mean(dim=1)
    return total


LOSS_FUNCTIONS = {"mse": mse_loss, "l1": l1_loss, "sdr": sdr_loss, "mrstft": mrstft_loss, "cstft": cstft_loss}


def loss_terms(name: str) -> tuple[str, ...]:
    """The terms of a ``+``-joined loss name (``"l1+mrstft"``); :class:`ValueError` naming an
    unknown or repeated term."""
    terms = tuple(t.strip() for t in name.split("+"))
    for t in terms:
        if t not in LOSSES["waveform"]:
            raise ValueError(f"unknown loss {t!r}; one of {', '.join(LOSSES['waveform'])}, or a sum of them such as l1+mrstft")
    if len(set(terms)) != len(terms):
        raise ValueError(f"loss {name!r} names a term twice")
    return terms


def loss_function(name: str):
    """The per-target loss ``(estimate, target, mix) -> (targets,)`` of a loss name: one term of
    :data:`LOSS_FUNCTIONS`, or the sum of the terms of a ``+``-joined name."""
    fns = [LOSS_FUNCTIONS[t] for t in loss_terms(name)]
    if len(fns) == 1:
        return fns[0]

    def total(estimate, target, mix):
        return sum(fn(estimate, target, mix) for fn in fns)
    return total


def loss_name(kind: str, requested: str) -> str:
    """The loss a model of ``kind`` trains with: the kind's only one (spectrogram models always
    train on the MSE, as open-unmix, whatever ``--loss`` says), else ``requested`` (its terms
    checked by :func:`loss_terms`)."""
    if len(LOSSES[kind]) == 1:
        return LOSSES[kind][0]
    loss_terms(requested)
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
