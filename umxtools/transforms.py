"""STFT, ISTFT and magnitude exactly as open-unmix computes them.

open-unmix (``openunmix.transforms``) uses ``torch.stft`` with a periodic Hann window of
``n_fft`` samples, ``normalized=False``, ``onesided=True`` and reflect padding; training uses
``center=False`` and the separator ``center=True``. Magnitudes are ``|X|`` of the complex STFT.

Shapes: audio ``(..., samples)``; complex spectrograms ``(..., bins, frames)`` with
``bins = n_fft // 2 + 1``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# open-unmix's defaults (train.py: --nfft 4096 --nhop 1024; MUSDB18 is 44.1 kHz)
N_FFT = 4096
N_HOP = 1024
SAMPLE_RATE = 44100


@dataclass(frozen=True)
class STFTSettings:
    """The transform a cache was built with and a consumer expects."""

    sample_rate: int = SAMPLE_RATE
    n_fft: int = N_FFT
    n_hop: int = N_HOP
    center: bool = False
    window: str = "hann"

    @property
    def nb_bins(self) -> int:
        return self.n_fft // 2 + 1

    def nb_frames(self, nb_samples: int) -> int:
        return nb_frames(nb_samples, self.n_fft, self.n_hop, self.center)

    def as_dict(self) -> dict:
        return asdict(self)


def nb_frames(nb_samples: int, n_fft: int = N_FFT, n_hop: int = N_HOP, center: bool = False) -> int:
    """Number of STFT frames ``torch.stft`` gives for ``nb_samples`` samples (0 if too short)."""
    if center:
        return 1 + nb_samples // n_hop
    if nb_samples < n_fft:
        return 0
    return 1 + (nb_samples - n_fft) // n_hop


def _torch():
    # imported on first use: the settings and bin arithmetic here serve `umxtools --help`, cache
    # metadata and the CLI, which should not pay torch's 1.5 s import
    import torch

    return torch


def window(n_fft: int = N_FFT, device: "torch.device | str | None" = None, dtype=None) -> torch.Tensor:
    """Periodic Hann window, what ``torch.hann_window(n_fft)`` (open-unmix's window) returns."""
    torch = _torch()
    return torch.hann_window(n_fft, periodic=True, device=device, dtype=dtype or torch.float32)


def stft(
    audio: torch.Tensor,
    n_fft: int = N_FFT,
    n_hop: int = N_HOP,
    center: bool = False,
    win: torch.Tensor | None = None,
) -> torch.Tensor:
    """Complex STFT of ``(..., samples)`` audio -> ``(..., bins, frames)`` complex."""
    torch = _torch()
    *lead, nb_samples = audio.shape
    if win is None:
        win = window(n_fft, device=audio.device, dtype=audio.dtype)
    spec = torch.stft(
        audio.reshape(-1, nb_samples),  # (batch, samples): torch.stft takes at most one batch axis
        n_fft=n_fft,
        hop_length=n_hop,
        window=win,
        center=center,
        normalized=False,
        onesided=True,
        pad_mode="reflect",
        return_complex=True,
    )
    return spec.reshape(*lead, *spec.shape[-2:])


def istft(
    spec: torch.Tensor,
    n_fft: int = N_FFT,
    n_hop: int = N_HOP,
    center: bool = True,
    length: int | None = None,
    win: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`stft`: ``(..., bins, frames)`` complex -> ``(..., samples)``."""
    torch = _torch()
    *lead, nb_bins, frames = spec.shape
    if win is None:
        win = window(n_fft, device=spec.device, dtype=spec.real.dtype)
    audio = torch.istft(
        spec.reshape(-1, nb_bins, frames),
        n_fft=n_fft,
        hop_length=n_hop,
        window=win,
        center=center,
        normalized=False,
        onesided=True,
        length=length,
    )
    return audio.reshape(*lead, audio.shape[-1])


def magnitude(spec: torch.Tensor) -> torch.Tensor:
    """``|X|`` of a complex spectrogram, or of a real one whose last axis is (real, imag)."""
    if spec.is_complex():
        return spec.abs()
    return _torch().linalg.vector_norm(spec, dim=-1)


def bandwidth_to_max_bin(rate: float, n_fft: int, bandwidth: float) -> int:
    """Number of bins up to ``bandwidth`` Hz, as ``openunmix.utils.bandwidth_to_max_bin``.

    open-unmix counts the bins whose centre frequency (``linspace(0, rate / 2, n_fft // 2 + 1)``)
    is at most the bandwidth; 16 kHz at 44.1 kHz and n_fft 4096 gives 1487.
    """
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1, endpoint=True)
    return int(np.max(np.where(freqs <= bandwidth)[0]) + 1)
