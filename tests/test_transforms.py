"""umxtools.transforms against open-unmix's formulas, written out with torch.stft directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.test_separate import RATE, music
from umxtools import transforms
from umxtools.transforms import CentredSTFT, OverlapAdd


def _audio(seconds=1.0, channels=2, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, int(seconds * 44100), generator=g)


def test_window_is_periodic_hann():
    n = 4096
    k = torch.arange(n, dtype=torch.float64)
    analytic = 0.5 - 0.5 * torch.cos(2 * math.pi * k / n)  # periodic: divides by n, not n - 1
    assert torch.allclose(transforms.window(n).double(), analytic, atol=1e-7)


@pytest.mark.parametrize("center", [False, True])
def test_stft_matches_open_unmix_formula(center):
    x = _audio()
    nb_samples, nb_channels, nb_timesteps = x.shape
    ref = torch.stft(x.reshape(-1, nb_timesteps), n_fft=4096, hop_length=1024, window=torch.hann_window(4096),
                     center=center, normalized=False, onesided=True, pad_mode="reflect", return_complex=True)
    ref = ref.reshape(nb_samples, nb_channels, *ref.shape[-2:])
    got = transforms.stft(x, center=center)
    assert got.shape == (3, 2, 2049, transforms.nb_frames(nb_timesteps, center=center))
    assert torch.equal(got, ref)


def test_stft_of_one_frame_is_the_windowed_dft():
    """Analytic check: frame f of the center=False STFT is the DFT of x[f*hop : f*hop + n_fft] * w."""
    x = _audio(seconds=0.3, batch=1, channels=1)[0, 0].double()
    spec = transforms.stft(x, center=False, win=transforms.window(4096, dtype=torch.float64))
    f = 3
    seg = x[f * 1024:f * 1024 + 4096] * transforms.window(4096, dtype=torch.float64)
    dft = np.fft.rfft(seg.numpy())
    np.testing.assert_allclose(spec[:, f].numpy(), dft, rtol=1e-9, atol=1e-9)


def test_istft_inverts_centered_stft():
    x = _audio(seconds=2.0)
    y = transforms.istft(transforms.stft(x, center=True), center=True, length=x.shape[-1])
    assert torch.allclose(x, y, atol=1e-5)


def test_magnitude_of_complex_and_real_pairs():
    spec = transforms.stft(_audio(seconds=0.5))
    mag = transforms.magnitude(spec)
    assert torch.allclose(mag, torch.sqrt(spec.real ** 2 + spec.imag ** 2), rtol=1e-6, atol=1e-6)
    assert torch.allclose(transforms.magnitude(torch.view_as_real(spec)), mag, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("samples,center,expected", [(4095, False, 0), (4096, False, 1), (4096 + 1023, False, 1),
                                                      (4096 + 1024, False, 2), (0, True, 1), (2048, True, 3)])
def test_nb_frames_agrees_with_torch(samples, center, expected):
    assert transforms.nb_frames(samples, center=center) == expected
    if expected > 0 and (not center or samples > 2048):
        got = torch.stft(torch.zeros(samples), 4096, 1024, window=torch.hann_window(4096), center=center,
                         return_complex=True).shape[-1]
        assert got == expected


def test_bandwidth_to_max_bin():
    # analytic: bin k has frequency k * 22050 / 2048; k <= 16000 * 2048 / 22050 = 1486.1 -> 1487 bins
    assert transforms.bandwidth_to_max_bin(44100, 4096, 16000) == 1487
    assert transforms.bandwidth_to_max_bin(44100, 4096, 22050) == 2049
    assert transforms.bandwidth_to_max_bin(44100, 4096, 0) == 1


def test_against_openunmix_package(openunmix):
    """The reference implementation itself, where installed (its torchaudio import is stubbed)."""
    ou_transforms, ou_utils = openunmix.transforms, openunmix.utils
    for bw in (0, 8000, 16000, 20000, 22050):
        assert transforms.bandwidth_to_max_bin(44100.0, 4096, bw) == int(ou_utils.bandwidth_to_max_bin(44100.0, 4096, bw))
    x = _audio()
    for center in (False, True):
        enc, dec = ou_transforms.make_filterbanks(n_fft=4096, n_hop=1024, center=center)
        ref = torch.view_as_complex(enc(x))
        assert torch.equal(transforms.stft(x, center=center), ref)
        mag = ou_transforms.ComplexNorm()(enc(x))
        assert torch.allclose(transforms.magnitude(ref), mag)
    enc, dec = ou_transforms.make_filterbanks(n_fft=4096, n_hop=1024, center=True)
    spec = enc(x)
    assert torch.allclose(transforms.istft(torch.view_as_complex(spec), length=x.shape[-1]), dec(spec, length=x.shape[-1]))


# --- the separator's transforms in pieces against torch.stft / torch.istft on the whole signal -------


@pytest.mark.parametrize("length", [4096, 5000, 44100 + 513, 3 * 1024])
def test_centred_stft_frames_equal_torch_stft(length):
    audio = torch.from_numpy(music(length / RATE + 1e-9, silence=None)[:, :length])
    whole = torch.stft(audio, 4096, 1024, window=torch.hann_window(4096), center=True, return_complex=True)  # (2, bins, frames)
    stft = CentredSTFT(audio, 4096, 1024)
    assert stft.nb_frames == whole.shape[-1]
    bounds = [0, 1, 3, stft.nb_frames - 2, stft.nb_frames]
    for a, b in zip(bounds, bounds[1:]):
        if a < b:
            assert torch.equal(stft.frames(a, b), whole[..., a:b])


@pytest.mark.parametrize("length", [4096, 4097, 30000, 44100])
def test_overlap_add_in_pieces_equals_istft(length):
    g = torch.Generator().manual_seed(length)
    nb_frames = 1 + length // 1024
    spec = torch.complex(torch.randn(3, 2, nb_frames, 2049, generator=g), torch.randn(3, 2, nb_frames, 2049, generator=g))
    whole = torch.istft(spec.transpose(-1, -2).reshape(6, 2049, nb_frames), 4096, 1024, window=torch.hann_window(4096),
                        center=True, length=length).reshape(3, 2, length)
    ola = OverlapAdd(4096, 1024, length)
    cuts = [0, 1, 2, 7, nb_frames]
    pieces = [ola.push(spec[:, :, a:b]) for a, b in zip(cuts, cuts[1:]) if a < b] + [ola.finish()]
    got = torch.cat(pieces, dim=-1)
    assert got.shape == whole.shape
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-5)
