"""umxtools.filtering.wiener against openunmix.filtering.wiener, value for value.

The grid is open-unmix's own tests/test_wiener.py (channels 1 and 2, one to three sources, 0 to 2
EM iterations, soft mask or not, residual or not, uniform random magnitudes and mixtures), where
open-unmix checks shapes only; here every output must equal open-unmix's bit for bit. Two shapes:
open-unmix's smallest (10 frames, 10 bins) and 230 frames (two of open-unmix's 200-frame chunks
of covariance sums) by 127 bins (a bin count at which the order of torch's sums over frames
depends on the tensor layout). umxtools takes ``(sources, channels, frames, bins)`` magnitudes;
they are handed over as a permuted, non-contiguous view of open-unmix's layout.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from umxtools import filtering

SHAPES = [(10, 10), (230, 127)]  # (frames, bins)
CASES = list(itertools.product(SHAPES, [1, 2], [1, 2, 3], [0, 1, 2], [False, True], [False, True]))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def inputs(nb_frames, nb_bins, nb_channels, nb_sources, dtype=torch.float32, seed=0):
    """open-unmix's test inputs, in its layouts: targets ``(frames, bins, channels, sources)``,
    mixture ``(frames, bins, channels, 2)``; a few mixture bins exactly zero (its atan2 rule)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.rand((nb_frames, nb_bins, nb_channels, nb_sources), generator=g, dtype=dtype)
    mix = torch.rand((nb_frames, nb_bins, nb_channels, 2), generator=g, dtype=dtype)
    mix[1, :3] = 0
    return targets, mix


def both(targets, mix, iterations, softmask=False, residual=False):
    """(umxtools, open-unmix) estimates, each ``(sources [+1], channels, frames, bins)`` complex."""
    import openunmix.filtering as of

    theirs = of.wiener(targets.clone(), mix.clone(), iterations=iterations, softmask=softmask, residual=residual)
    theirs = torch.view_as_complex(theirs.permute(4, 2, 0, 1, 3).contiguous())
    magnitudes = targets.permute(3, 2, 0, 1)  # (sources, channels, frames, bins), not contiguous
    spec = torch.view_as_complex(mix.permute(2, 0, 1, 3).contiguous())  # (channels, frames, bins)
    ours = filtering.wiener(magnitudes, spec, iterations, softmask=softmask, residual=residual)
    return ours, theirs


@pytest.mark.parametrize(
    ("shape", "nb_channels", "nb_sources", "iterations", "softmask", "residual"),
    CASES,
    ids=[f"{f}x{b}-ch{c}-src{s}-it{i}" + "-soft" * m + "-res" * r for (f, b), c, s, i, m, r in CASES],
)
def test_wiener_equals_openunmix(openunmix, shape, nb_channels, nb_sources, iterations, softmask, residual):
    targets, mix = inputs(*shape, nb_channels, nb_sources)
    ours, theirs = both(targets, mix, iterations, softmask, residual)
    assert ours.shape == theirs.shape == (nb_sources + residual, nb_channels, *shape)
    assert ours.dtype == torch.complex64
    assert torch.equal(ours, theirs)  # also false for any NaN


@pytest.mark.parametrize("nb_channels", [1, 2])
def test_float64_equals_openunmix(openunmix, nb_channels):
    """open-unmix's test_dtype: float64 in, float64 out; open-unmix's eps and sqrt(eps) are float32
    scalars promoted to float64, and umxtools rounds them the same way."""
    targets, mix = inputs(230, 127, nb_channels, 3, dtype=torch.float64)
    for iterations, residual in ((1, False), (2, True)):
        ours, theirs = both(targets, mix, iterations, residual=residual)
        assert ours.dtype == torch.complex128
        assert torch.equal(ours, theirs), (iterations, residual)


def test_mono_model_on_a_stereo_mixture_equals_openunmix(openunmix):
    """One channel of magnitudes broadcast over a stereo mixture, as a mono model's output."""
    targets, _ = inputs(230, 127, 1, 2, seed=1)
    _, mix = inputs(230, 127, 2, 2, seed=2)
    for softmask, residual in ((False, False), (True, True)):
        ours, theirs = both(targets, mix, 2, softmask, residual)
        assert ours.shape == (2 + residual, 2, 230, 127)
        assert torch.equal(ours, theirs)


def test_three_channels_are_refused():
    with pytest.raises(ValueError, match="mono and stereo"):
        filtering.wiener(torch.rand(2, 3, 5, 4), torch.rand(3, 5, 4, dtype=torch.complex64), 1)
