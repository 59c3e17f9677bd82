"""An end-to-end time-domain separator: the Demucs (v2) U-Net of Défossez et al.

Reference: A. Défossez, N. Usunier, L. Bottou, F. Bach, "Music Source Separation in the Waveform
Domain", arXiv:1911.13254 (2019), and its code (facebookresearch/demucs, v2 branch,
``demucs/model.py``). A convolutional encoder (kernel 8, stride 4, each layer followed by a 1x1
convolution and a GLU), a bidirectional LSTM at the bottleneck, and a mirrored decoder of
transposed convolutions with U-Net skip connections, predicting every target's waveform at
once. What is kept from v2: the layer structure, GLU "rewrite" layers, the weight rescaling at
initialisation (``rescale``), the per-example input normalisation (``normalize``), and the valid-
length padding. Left out: v2's 2x upsampling of the input (``resample``, which needs a sinc
resampler; the model works at the cache's sample rate) — so the receptive field in seconds is
half of v2's for the same depth.

``forward`` takes any length: the input is zero-padded on both sides to the next length the
strided convolutions accept (:meth:`Demucs.valid_length`) and the output cut back to the input's
length, so the interface is the one docs/model-format.md gives for ``kind: "waveform"``.

Shapes: input ``(batch, channels, samples)``; output ``(batch, targets, channels, samples)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BLSTM(nn.Module):
    """Bidirectional LSTM over ``(batch, channels, time)`` with a linear map back to ``channels``."""

    def __init__(self, dim: int, layers: int = 2):
        super().__init__()
        self.lstm = nn.LSTM(bidirectional=True, num_layers=layers, hidden_size=dim, input_size=dim)
        self.linear = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(2, 0, 1)  # (time, batch, channels)
        x = self.linear(self.lstm(x)[0])
        return x.permute(1, 2, 0)


def _rescale(module: nn.Module, reference: float) -> None:
    """Demucs v2's initialisation: scale each convolution so its weights' std is about
    ``sqrt(std * reference)``; the paper reports it speeds up and stabilises training."""
    for sub in module.modules():
        if isinstance(sub, (nn.Conv1d, nn.ConvTranspose1d)):
            std = sub.weight.std().detach()
            scale = (std / reference) ** 0.5
            sub.weight.data /= scale
            if sub.bias is not None:
                sub.bias.data /= scale


def _center_trim(x: torch.Tensor, length: int) -> torch.Tensor:
    """The central ``length`` samples of the last axis."""
    delta = x.shape[-1] - length
    assert delta >= 0, (x.shape, length)
    return x[..., delta // 2:x.shape[-1] - (delta - delta // 2)]


class Demucs(nn.Module):
    """Demucs v2 (waveform U-Net with a BLSTM bottleneck).

    Args:
        targets: target names, in output order.
        nb_channels: audio channels (2).
        channels: channels of the first encoder layer (v2 default 64; the paper's best used 100).
        depth: encoder (and decoder) layers (v2: 6).
        kernel_size, stride: of every strided convolution (v2: 8, 4).
        context: kernel of the decoder's 1-D "rewrite" convolution (v2: 3).
        growth: channel multiplier per layer (v2: 2).
        lstm_layers: BLSTM layers at the bottleneck (v2: 2; 0 for none).
        rescale: weight rescaling reference at initialisation (v2: 0.1; 0 disables it).
        normalize: divide the input by the std of its mono mix (and multiply the output back),
            so the network sees unit-level input whatever the track's loudness.
    """

    kind = "waveform"
    segmenting = None  # any length works: run whole, or on cross-faded --segment pieces

    def __init__(
        self,
        targets: list[str],
        nb_channels: int = 2,
        channels: int = 64,
        depth: int = 6,
        kernel_size: int = 8,
        stride: int = 4,
        context: int = 3,
        growth: float = 2.0,
        lstm_layers: int = 2,
        rescale: float = 0.1,
        normalize: bool = True,
    ):
        super().__init__()
        self.targets = list(targets)
        self.nb_channels = nb_channels
        self.depth, self.kernel_size, self.stride, self.context = depth, kernel_size, stride, context
        self.normalize = normalize
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        in_channels = nb_channels
        for index in range(depth):
            self.encoder.append(nn.Sequential(
                nn.Conv1d(in_channels, channels, kernel_size, stride), nn.ReLU(),
                nn.Conv1d(channels, 2 * channels, 1), nn.GLU(dim=1),
            ))
            out_channels = in_channels if index > 0 else len(self.targets) * nb_channels
            decode = [nn.Conv1d(channels, 2 * channels, context), nn.GLU(dim=1),
                      nn.ConvTranspose1d(channels, out_channels, kernel_size, stride)]
            if index > 0:
                decode.append(nn.ReLU())
            self.decoder.insert(0, nn.Sequential(*decode))
            in_channels = channels
            channels = int(growth * channels)
        self.lstm = BLSTM(in_channels, lstm_layers) if lstm_layers else None
        if rescale:
            _rescale(self, reference=rescale)

    def valid_length(self, length: int) -> int:
        """The smallest length >= ``length`` whose every strided convolution divides evenly
        (as v2's ``valid_length``, without its resampling)."""
        for _ in range(self.depth):
            length = max(1, math.ceil((length - self.kernel_size) / self.stride) + 1)
            length += self.context - 1
        for _ in range(self.depth):
            length = (length - 1) * self.stride + self.kernel_size
        return int(length)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """``(batch, channels, samples)`` -> ``(batch, targets, channels, samples)``."""
        nb_samples, nb_channels, length = mix.shape
        if self.normalize:
            mono = mix.mean(dim=1, keepdim=True)  # (batch, 1, samples)
            mean = mono.mean(dim=-1, keepdim=True)
            std = mono.std(dim=-1, keepdim=True)
            x = (mix - mean) / (1e-5 + std)
        else:
            mean, std = 0.0, 1.0
            x = mix
        delta = self.valid_length(length) - length
        x = F.pad(x, (delta // 2, delta - delta // 2))
        saved = []
        for encode in self.encoder:
            x = encode(x)
            saved.append(x)
        if self.lstm is not None:
            x = self.lstm(x)
        for decode in self.decoder:
            x = x + _center_trim(saved.pop(-1), x.shape[-1])  # U-Net skip, cut to the decoder's length
            x = decode(x)
        x = _center_trim(x, length) * std + mean  # (batch, targets * channels, samples)
        return x.reshape(nb_samples, len(self.targets), nb_channels, length)
