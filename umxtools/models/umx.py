"""The Open-Unmix spectrogram model (UMX), state-dict compatible with ``openunmix.model.OpenUnmix``.

Parameter names and shapes are open-unmix's (fc1, bn1, lstm, fc2, bn2, fc3, bn3, input_mean,
input_scale, output_mean, output_scale), so ``openunmix.utils.load_separator`` loads what umxtools
trains and umxtools loads the published weights. Reference: Stöter et al., "Open-Unmix - A
Reference Implementation for Music Source Separation", JOSS 2019.

Shapes: input and output magnitudes ``(batch, channels, bins, frames)``; internally
``(frames, batch, channels, bins)`` as open-unmix.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class OpenUnmix(nn.Module):
    """Fully connected encoder, (B)LSTM with a skip connection, fully connected decoder; the
    output is a non-negative mask-like gain applied to the input magnitude.

    ``forward`` is :meth:`decode` of :meth:`encode` and :meth:`context`: ``umxtools separate``
    calls the three itself, so that only the LSTM sees the whole track (docs/separate.md).

    Args:
        nb_bins: output bins (``n_fft // 2 + 1``).
        nb_channels: audio channels.
        hidden_size: width of the bottleneck (the LSTM's output width).
        nb_layers: LSTM layers.
        unidirectional: causal LSTM instead of a bidirectional one.
        input_mean, input_scale: per-bin mean and std of the training mixture magnitude (the
            cache statistics); stored as ``-mean`` and ``1 / std`` of the first ``max_bin`` bins.
        max_bin: bins the model sees (bandwidth); all ``nb_bins`` are estimated.
    """

    kind = "spectrogram"
    segmenting = None  # never cut: the BLSTM hears the whole track (umxtools.separation streams the rest)

    def __init__(
        self,
        nb_bins: int = 2049,
        nb_channels: int = 2,
        hidden_size: int = 512,
        nb_layers: int = 3,
        unidirectional: bool = False,
        input_mean: np.ndarray | None = None,
        input_scale: np.ndarray | None = None,
        max_bin: int | None = None,
    ):
        super().__init__()
        self.nb_output_bins = nb_bins
        self.nb_bins = max_bin or nb_bins
        self.nb_channels = nb_channels
        self.hidden_size = hidden_size
        self.fc1 = nn.Linear(self.nb_bins * nb_channels, hidden_size, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden_size)
        self.lstm = nn.LSTM(
            input_size=hidden_size,
            hidden_size=hidden_size if unidirectional else hidden_size // 2,
            num_layers=nb_layers,
            bidirectional=not unidirectional,
            batch_first=False,
            dropout=0.4 if nb_layers > 1 else 0.0,  # open-unmix's value
        )
        self.fc2 = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.bn2 = nn.BatchNorm1d(hidden_size)
        self.fc3 = nn.Linear(hidden_size, self.nb_output_bins * nb_channels, bias=False)
        self.bn3 = nn.BatchNorm1d(self.nb_output_bins * nb_channels)
        mean = torch.zeros(self.nb_bins) if input_mean is None else -torch.as_tensor(np.asarray(input_mean)[: self.nb_bins])
        scale = torch.ones(self.nb_bins) if input_scale is None else 1.0 / torch.as_tensor(np.asarray(input_scale)[: self.nb_bins])
        # trainable, as in open-unmix (they are Parameters there too)
        self.input_mean = nn.Parameter(mean.float())
        self.input_scale = nn.Parameter(scale.float())
        self.output_scale = nn.Parameter(torch.ones(self.nb_output_bins))
        self.output_mean = nn.Parameter(torch.ones(self.nb_output_bins))

    def freeze(self) -> "OpenUnmix":
        for p in self.parameters():
            p.requires_grad = False
        return self.eval()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The frame-wise encoder (normalisation, ``fc1``, ``bn1``, ``tanh``):
        ``(frames, batch, channels, bins)`` magnitude -> ``(frames, batch, hidden)``.

        Each frame alone: the separator runs it on chunks of frames (umxtools.separation).
        """
        nb_frames, nb_samples, nb_channels, _ = x.shape
        x = (x[..., : self.nb_bins] + self.input_mean) * self.input_scale
        x = self.fc1(x.reshape(-1, nb_channels * self.nb_bins))  # (frames * batch, hidden)
        return torch.tanh(self.bn1(x)).reshape(nb_frames, nb_samples, self.hidden_size)

    def context(self, h: torch.Tensor) -> torch.Tensor:
        """The (B)LSTM over the whole sequence: ``(frames, batch, hidden)`` -> ``(frames, batch, hidden)``.

        The only step that needs every frame at once (bidirectional), so a UMX is never cut
        into segments.
        """
        return self.lstm(h)[0]

    def decode(self, h: torch.Tensor, c: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        """The frame-wise decoder, from :meth:`encode`'s and :meth:`context`'s outputs of the same
        frames (``(frames, batch, hidden)`` each) and their mixture magnitude ``mix``
        ``(frames, batch, channels, bins)`` -> the target magnitude ``(frames, batch, channels, bins)``.
        """
        nb_frames, nb_samples, nb_channels, _ = mix.shape
        skip = torch.cat([h, c], -1)  # (frames, batch, 2 * hidden)
        x = F.relu(self.bn2(self.fc2(skip.reshape(-1, skip.shape[-1]))))
        x = self.bn3(self.fc3(x)).reshape(nb_frames, nb_samples, nb_channels, self.nb_output_bins)
        return F.relu(x * self.output_scale + self.output_mean) * mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, channels, bins, frames)`` magnitude -> same-shaped target magnitude."""
        x = x.permute(3, 0, 1, 2)  # (frames, batch, channels, bins)
        h = self.encode(x)
        return self.decode(h, self.context(h), x.detach()).permute(1, 2, 3, 0)
