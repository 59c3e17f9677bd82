"""STFT, ISTFT and magnitude exactly as open-unmix computes them.

open-unmix (``openunmix.transforms``) uses ``torch.stft`` with a periodic Hann window of
``n_fft`` samples, ``normalized=False``, ``onesided=True`` and reflect padding; training uses
``center=False`` and the separator ``center=True``. Magnitudes are ``|X|`` of the complex STFT.

Shapes: audio ``(..., samples)``; complex spectrograms ``(..., bins, frames)`` with
``bins = n_fft // 2 + 1``.

:class:`CentredSTFT` and :class:`OverlapAdd` are the separator's transforms (``center=True``) in
pieces: frames on demand and overlap-add of consecutive frames, equal to ``torch.stft`` and
``torch.istft`` on the whole signal (tested), so that a separation holds one window at a time.
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


# --- streamed: the separator's STFT and ISTFT, window by window --------------------------------------


class CentredSTFT:
    """Frames of open-unmix's separator STFT (``center=True``, reflect padding), on demand.

    ``frames(a, b)`` equals frames ``a:b`` of ``torch.stft(audio, center=True)`` (same samples,
    same window, same FFT, same layout) without padding or transforming the whole signal.
    """

    def __init__(self, audio: torch.Tensor, n_fft: int, n_hop: int):
        self.audio, self.n_fft, self.n_hop = audio, n_fft, n_hop
        self.length = audio.shape[-1]
        if self.length <= n_fft // 2:
            raise ValueError(f"reflect padding needs more than {n_fft // 2} samples, got {self.length}")
        self.nb_frames = 1 + self.length // n_hop  # torch.stft with center=True
        self.window = window(n_fft, device=audio.device)

    def frames(self, a: int, b: int) -> torch.Tensor:
        """Frames ``a:b``: ``(channels, bins, b - a)`` complex, contiguous (torch.stft's layout)."""
        torch = _torch()
        pad = self.n_fft // 2
        lo, hi = a * self.n_hop - pad, (b - 1) * self.n_hop + self.n_fft - pad  # samples of the unpadded signal
        if lo >= 0 and hi <= self.length:
            x = self.audio[:, lo:hi]
        else:  # reflect at the ends, as torch.stft's padding: x[-k] = x[k], x[L-1+k] = x[L-1-k]
            idx = torch.arange(lo, hi, device=self.audio.device)
            idx = idx.abs()
            idx = torch.where(idx > self.length - 1, 2 * (self.length - 1) - idx, idx)
            x = self.audio[:, idx]
        return torch.stft(x, self.n_fft, self.n_hop, window=self.window, center=False, normalized=False,
                          onesided=True, return_complex=True)


class OverlapAdd:
    """The inverse of :class:`CentredSTFT`, streamed: ``torch.istft(center=True, length=L)`` in pieces.

    ``push`` takes the next frames ``(..., frames, bins)`` complex and returns the output samples
    that no later frame touches any more, ``(..., n)``; ``finish`` returns the rest, so that all
    outputs together are exactly ``length`` samples. As ``torch.istft``: inverse real FFT, window,
    overlap-add, division by the overlap-added squared window, the first ``n_fft // 2`` samples
    (the centring padding) dropped.
    """

    def __init__(self, n_fft: int, n_hop: int, length: int, device=None):
        self.n_fft, self.n_hop, self.length = n_fft, n_hop, length
        self.window = window(n_fft, device=device)
        self.pad = n_fft // 2
        self.start = 0  # padded position of the carried tail's first sample = next frame * hop
        self.tail: torch.Tensor | None = None  # (..., n_fft - hop) partial sums of past frames
        self.env_tail: torch.Tensor | None = None
        self.emitted = 0

    def push(self, spec: torch.Tensor) -> torch.Tensor:
        torch = _torch()
        *lead, nb_frames, nb_bins = spec.shape
        sig = spec.new_empty(*lead, (nb_frames - 1) * self.n_hop + self.n_fft, dtype=self.window.dtype)
        # one (source, channel) signal at a time: the frames of all of them at once would be the
        # largest tensor of a whole separation
        for i in np.ndindex(*lead):
            frames = torch.fft.irfft(spec[i], n=self.n_fft, dim=-1).mul_(self.window)  # (frames, n_fft)
            sig[i] = _overlap_add(frames, self.n_hop)  # ((frames - 1) * hop + n_fft,)
        env = _overlap_add((self.window * self.window).expand(nb_frames, -1), self.n_hop)
        keep = self.n_fft - self.n_hop
        if self.tail is not None:
            sig[..., :keep] += self.tail
            env[:keep] += self.env_tail
        done = nb_frames * self.n_hop
        self.tail, self.env_tail = sig[..., done:], env[done:]
        out = self._emit(sig[..., :done], env[:done])
        self.start += done
        return out

    def finish(self) -> torch.Tensor:
        """The samples after the last frame's hop; zeros if the frames end before ``length``."""
        assert self.tail is not None, "push frames first"
        out = self._emit(self.tail, self.env_tail)
        missing = self.length - self.emitted
        if missing > 0:
            out = _torch().cat([out, out.new_zeros(*out.shape[:-1], missing)], dim=-1)
            self.emitted += missing
        return out

    def _emit(self, sig: torch.Tensor, env: torch.Tensor) -> torch.Tensor:
        # padded positions [start, start + n) -> output samples [start - pad, ...) within [0, length)
        first = max(self.pad, self.start)
        last = min(self.pad + self.length, self.start + sig.shape[-1])
        if last <= first:
            return sig[..., :0]
        a, b = first - self.start, last - self.start
        self.emitted += b - a
        return sig[..., a:b].div_(env[a:b])


def _overlap_add(frames: torch.Tensor, hop: int) -> torch.Tensor:
    """``(..., frames, n)`` -> ``(..., (frames - 1) * hop + n)``: frame ``t`` added at ``t * hop``."""
    *lead, nb_frames, n = frames.shape
    if n % hop == 0:
        # n / hop shifted copies of the frames, cut in hop-long pieces: R additions, no scatter
        r = n // hop
        pieces = frames.reshape(*lead, nb_frames, r, hop)
        out = frames.new_zeros(*lead, nb_frames + r - 1, hop)
        for k in range(r):
            out[..., k:k + nb_frames, :] += pieces[..., k, :]
        return out.reshape(*lead, (nb_frames + r - 1) * hop)
    flat = frames.reshape(-1, nb_frames, n).transpose(1, 2)  # (batch, n, frames) columns for fold
    size = (nb_frames - 1) * hop + n
    out = _torch().nn.functional.fold(flat, output_size=(1, size), kernel_size=(1, n), stride=(1, hop))
    return out.reshape(*lead, size)
