"""One Open-Unmix per target, trained together: the ``OpenUnmixJoint`` of open-unmix's guide.

open-unmix's "Extending Open-Unmix" (docs/extensions.md, "Jointly train targets") joins the
forward paths of several ``OpenUnmix`` models in a ``ModuleList`` and sums their MSE losses. This
is that model, with the output stacked into one tensor as docs/model-format.md asks of spectrogram
models, and with :meth:`OpenUnmixJoint.target_models` to export each part as an open-unmix file.

Shapes: input mixture magnitude ``(batch, channels, bins, frames)``; output
``(batch, targets, channels, bins, frames)`` in ``targets`` order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from umxtools.models.umx import OpenUnmix


class OpenUnmixJoint(nn.Module):
    """``len(targets)`` independent :class:`OpenUnmix` models sharing one input.

    Args:
        targets: target names, in output order.
        nb_bins, nb_channels, hidden_size, nb_layers, unidirectional, max_bin: as
            :class:`OpenUnmix` (the same for every target, as in the guide).
        input_mean, input_scale: the mixture statistics every part starts from (they are
            trainable per part afterwards, as in open-unmix).
    """

    kind = "spectrogram"
    # run whole, then streamed as per-target UMX models (umxtools.models.loading finds them through
    # target_models); no segment rule of its own
    segmenting = None

    def __init__(
        self,
        targets: list[str],
        nb_bins: int = 2049,
        nb_channels: int = 2,
        hidden_size: int = 512,
        nb_layers: int = 3,
        unidirectional: bool = False,
        max_bin: int | None = None,
        input_mean: np.ndarray | None = None,
        input_scale: np.ndarray | None = None,
    ):
        super().__init__()
        self.targets = list(targets)
        self.models = nn.ModuleList(
            OpenUnmix(nb_bins=nb_bins, nb_channels=nb_channels, hidden_size=hidden_size, nb_layers=nb_layers,
                      unidirectional=unidirectional, input_mean=input_mean, input_scale=input_scale, max_bin=max_bin)
            for _ in self.targets
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, channels, bins, frames)`` -> ``(batch, targets, channels, bins, frames)``."""
        return torch.stack([model(x) for model in self.models], dim=1)

    def target_models(self) -> dict[str, OpenUnmix]:
        """Each target's :class:`OpenUnmix`: its state dict is an open-unmix ``<target>.pth``."""
        return dict(zip(self.targets, self.models))
