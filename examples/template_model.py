"""Your own separation model, trained with ``umxtools train --model FILE.py:CLASS``.

This is open-unmix's "Template Spectrogram Model" (docs/extensions.md of open-unmix) made
concrete: copy this file, change the layers, and train it on any cache::

    umxtools train cache/toy-train.h5 --valid cache/toy-valid.h5 --targets vocals,drums \\
        --model examples/template_model.py:TemplateModel --model-arg hidden_size=128 -o models/template
    umxtools train cache/toy-train.h5 --valid cache/toy-valid.h5 --target vocals \\
        --model examples/template_model.py:TemplateWaveformModel --loss sdr -o models/template-wave

``MODULE:CLASS`` is a file path ending in ``.py`` or a dotted module on ``sys.path``
(``mypackage.models:MyModel``). Two working examples follow: :class:`TemplateModel`
(spectrogram masks) and :class:`TemplateWaveformModel` (a learned filterbank, time domain).

The contract (checked by ``umxtools.models.load_class`` and ``umxtools.training``)
---------------------------------------------------------------------------------
``kind`` (class attribute)
    ``"spectrogram"`` or ``"waveform"``: what ``forward`` consumes and what the loss compares.
    A class without it is refused.

``segmenting`` (class attribute, optional)
    How ``umxtools separate`` runs the model: ``None`` (the default) runs it on the whole track,
    or on cross-faded pieces with ``--segment``; ``{"rule": "demucs"}`` or ``{"rule": "msst", ...}``
    names a rule of ``umxtools.segments``. Any other value is refused. umxtools' own classes
    (``umxtools.models.MODELS``) declare both attributes and keep this same contract.

``CLASS(**kwargs)``
    umxtools offers these keyword arguments, and passes those the constructor names (all of
    them if it takes ``**kwargs``; ``umxtools.models.accepted_args(CLASS)`` lists them):

    ==============  ==================================================================
    ``targets``     list of target names, in the order ``forward`` must return them
    ``nb_bins``     ``n_fft // 2 + 1`` (2049)
    ``nb_channels`` 2, or 1 with ``--nb-channels 1`` (the channel mean)
    ``sample_rate`` the cache's rate (44100)
    ``n_fft``       the cache's STFT size (4096); the STFT is open-unmix's (periodic Hann,
                    ``center=False`` in training)
    ``n_hop``       the cache's hop (1024)
    ``max_bin``     bins up to ``--bandwidth`` (1487 for 16 kHz)
    ==============  ==================================================================

    plus every ``--model-arg KEY=VALUE`` (VALUE parsed as JSON when it parses: ``4`` -> 4,
    ``true`` -> True, ``x`` -> ``"x"``). They are recorded in ``model.json`` (``args``), from
    which ``umxtools separate`` rebuilds the model, so they must be JSON values.

    Two more arguments are passed only to a constructor that names them: ``input_mean`` and
    ``input_scale``, numpy arrays ``(nb_bins,)``: the per-bin mean and standard deviation of the
    training mixture magnitude (the cache statistics; open-unmix's input normalisation). They
    are *not* recorded: when the model is rebuilt they are ``None``, so keep them in the state
    dict (as parameters or buffers) and accept ``None``.

``forward(x)``
    - ``kind = "spectrogram"``: ``x`` is the mixture magnitude ``(batch, channels, bins,
      frames)``; return non-negative magnitudes ``(batch, targets, channels, bins, frames)``
      (a single-target model may return ``(batch, channels, bins, frames)``). The loss is the
      sum over targets of the MSE against the true magnitudes (open-unmix's loss).
      ``umxtools separate`` applies open-unmix's Wiener filter to them.
    - ``kind = "waveform"``: ``x`` is the mixture ``(batch, channels, samples)``; return
      ``(batch, targets, channels, samples)``. The loss is ``--loss l1`` (mean absolute error)
      or ``--loss sdr`` (negative SDR), summed over targets. Any length must work (validation
      runs on whole tracks unless ``--valid-seq-dur`` is given).

    It may also return a list of per-target tensors (open-unmix's ``OpenUnmixJoint`` does).

What else umxtools relies on
----------------------------
- Determinism: umxtools seeds torch before building the model (``--seed``) and at every epoch;
  draw randomness from torch's generator (dropout does) and a resumed run repeats exactly.
- Distributed training (``torchrun``) wraps the model in ``DistributedDataParallel``: every
  parameter must take part in the loss.
- The state dict is the model's whole state: ``model.pth`` is ``model.state_dict()``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TemplateModel(nn.Module):
    """A small mask estimator: per-frame encoder, a temporal convolution for context, and one
    sigmoid mask per target and channel applied to the mixture magnitude.

    Args:
        targets, nb_bins, nb_channels, max_bin, input_mean, input_scale: offered by umxtools.
        hidden_size: width of the encoder (``--model-arg hidden_size=...``).
        context: frames the temporal convolution sees (odd).
    """

    kind = "spectrogram"

    def __init__(self, targets: list[str], nb_bins: int, nb_channels: int = 2, max_bin: int | None = None,
                 input_mean: np.ndarray | None = None, input_scale: np.ndarray | None = None,
                 hidden_size: int = 64, context: int = 5):
        super().__init__()
        self.nb_targets, self.nb_channels, self.nb_bins = len(targets), nb_channels, nb_bins
        self.max_bin = max_bin or nb_bins
        mean = np.zeros(self.max_bin) if input_mean is None else np.asarray(input_mean)[: self.max_bin]
        std = np.ones(self.max_bin) if input_scale is None else np.asarray(input_scale)[: self.max_bin]
        # parameters, not constants: they are saved in the state dict and trained (as open-unmix)
        self.input_mean = nn.Parameter(torch.as_tensor(-mean, dtype=torch.float32))
        self.input_scale = nn.Parameter(torch.as_tensor(1.0 / std, dtype=torch.float32))
        self.encoder = nn.Linear(self.max_bin * nb_channels, hidden_size)
        self.context = nn.Conv1d(hidden_size, hidden_size, context, padding=context // 2)
        self.decoder = nn.Linear(hidden_size, self.nb_targets * nb_channels * nb_bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, channels, bins, frames)`` -> ``(batch, targets, channels, bins, frames)``."""
        nb_samples, nb_channels, nb_bins, nb_frames = x.shape
        h = x[:, :, : self.max_bin].permute(0, 3, 1, 2)  # (batch, frames, channels, max_bin)
        h = (h + self.input_mean) * self.input_scale
        h = torch.tanh(self.encoder(h.reshape(nb_samples, nb_frames, -1)))  # (batch, frames, hidden)
        h = h + F.relu(self.context(h.transpose(1, 2))).transpose(1, 2)  # context across frames
        mask = torch.sigmoid(self.decoder(h))  # (batch, frames, targets * channels * bins)
        mask = mask.reshape(nb_samples, nb_frames, self.nb_targets, nb_channels, nb_bins).permute(0, 2, 3, 4, 1)
        return mask * x[:, None]  # (batch, targets, channels, bins, frames)


class TemplateWaveformModel(nn.Module):
    """A learned filterbank with masks, the time-domain pattern of TasNet (Luo & Mesgarani,
    2018) at its smallest: a strided convolution encodes, a small network estimates one mask
    per target, a transposed convolution decodes each masked representation.

    Args:
        targets, nb_channels: offered by umxtools.
        filters: encoder basis functions; kernel: their length in samples (stride kernel / 2).
        hidden_size: width of the mask network.
    """

    kind = "waveform"

    def __init__(self, targets: list[str], nb_channels: int = 2, filters: int = 128, kernel: int = 32, hidden_size: int = 128):
        super().__init__()
        self.nb_targets, self.nb_channels, self.kernel, self.stride = len(targets), nb_channels, kernel, kernel // 2
        self.encoder = nn.Conv1d(nb_channels, filters, kernel, stride=self.stride, bias=False)
        self.masker = nn.Sequential(
            nn.Conv1d(filters, hidden_size, 3, padding=1), nn.ReLU(),
            nn.Conv1d(hidden_size, hidden_size, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv1d(hidden_size, self.nb_targets * filters, 1),
        )
        self.decoder = nn.ConvTranspose1d(filters, nb_channels, kernel, stride=self.stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, channels, samples)`` -> ``(batch, targets, channels, samples)``."""
        nb_samples, nb_channels, length = x.shape
        pad = (-(length - self.kernel) % self.stride) if length >= self.kernel else self.kernel - length
        w = F.relu(self.encoder(F.pad(x, (0, pad))))  # (batch, filters, frames)
        masks = torch.sigmoid(self.masker(w)).reshape(nb_samples, self.nb_targets, -1, w.shape[-1])
        y = self.decoder((masks * w[:, None]).flatten(0, 1))  # (batch * targets, channels, samples + pad)
        return y[..., :length].reshape(nb_samples, self.nb_targets, nb_channels, length)
