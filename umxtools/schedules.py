"""What changes at every optimiser step besides the weights: the learning rate's schedule
(linear warm-up, then constant or a cosine decay) and the exponential moving average of the
weights (``train --ema``). Pure functions of the step; :mod:`umxtools.training` applies them."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """The learning rate of optimiser step ``step`` (from 0) over the groups' base rate: a linear
    warm-up over ``warmup_steps``, then 1 (``plateau``: open-unmix's per-epoch decay acts on the
    base rate) or a cosine from 1 to 0 over ``total_steps`` (``cosine``: Loshchilov & Hutter's
    SGDR without restarts)."""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if schedule == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * min(max(step, 0), total_steps) / total_steps))
    return factor


def update_ema(ema: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * w`` in place for every floating-point entry of
    ``weights`` (a state dict); other entries (step counters) take the weights' value."""
    with torch.no_grad():
        for k, w in weights.items():
            if w.is_floating_point():
                ema[k].mul_(decay).add_(w, alpha=1 - decay)
            else:
                ema[k].copy_(w)
