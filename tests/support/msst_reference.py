"""MSST's ``demix``, restated: the reference of umxtools.segments.MsstPlan (tests) and of bench/bench_models.py.

MSST is not installable (its ``utils`` pull training dependencies), so ``demix`` is restated as a
plain whole-signal function, written from reading ZFTurbo/Music-Source-Separation-Training
``utils/model_utils.py`` at commit 036e68f58067bc28e894e5177805ef3a78e020cc (``demix``, generic
mode, and ``_getWindowingArray``). audio-separator's ``mdxc_separator.demix`` is not MSST's
(Hamming windows, other padding), so it is not used as the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def msst_demix(model, mix: torch.Tensor, chunk_size: int, num_overlap: int, batch_size: int) -> torch.Tensor:
    """MSST's ``demix`` (generic mode) on ``(channels, samples)``, whole-signal, as MSST writes it:
    reflect-pad by ``border`` when longer than ``2 * border``; chunks every ``step``; a short last
    chunk padded by reflection when more than half full, else zeros; batches of ``batch_size``;
    linear fades of ``chunk_size // 10``, none at the start when the batch ends with the first
    chunk, else none at the end for the last batch; ``result / counter`` with NaN set to 0."""
    fade, step = chunk_size // 10, chunk_size // num_overlap
    border = chunk_size - step
    length = mix.shape[-1]
    pad = length > 2 * border and border > 0
    if pad:
        mix = F.pad(mix[None], (border, border), mode="reflect")[0]
    window = torch.ones(chunk_size)
    window[-fade:] = torch.linspace(1, 0, fade)
    window[:fade] = torch.linspace(0, 1, fade)
    starts = list(range(0, mix.shape[-1], step))
    batches = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]
    result = counter = None
    for b, batch in enumerate(batches):
        parts = []
        for s in batch:
            part = mix[:, s:s + chunk_size]
            mode = "reflect" if part.shape[-1] > chunk_size // 2 else "constant"
            parts.append(F.pad(part[None], (0, chunk_size - part.shape[-1]), mode=mode)[0])
        y = model(torch.stack(parts))
        if result is None:
            result = torch.zeros(y.shape[1], y.shape[2], mix.shape[-1])
            counter = torch.zeros_like(result)
        w = window.clone()
        if batch[-1] == 0:
            w[:fade] = 1
        elif b == len(batches) - 1:
            w[-fade:] = 1
        for j, s in enumerate(batch):
            n = min(chunk_size, mix.shape[-1] - s)
            result[..., s:s + n] += y[j, ..., :n] * w[:n]
            counter[..., s:s + n] += w[:n]
    est = torch.nan_to_num(result / counter, nan=0.0)
    return est[..., border:-border] if pad else est
