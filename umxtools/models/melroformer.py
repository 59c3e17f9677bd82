"""Mel-Band RoFormer (Wang et al., arXiv:2310.01809), MSST's checkpoint format.

The bands are the supports of a Slaney mel filterbank (librosa's ``filters.mel``, the paper's
section 2): overlapping, so a bin can belong to two bands. Each band reads all of its bins; the
complex masks that several bands estimate for one bin are averaged. Blocks and STFT are
:mod:`umxtools.models.roformer`'s; the filterbank is computed here in numpy (librosa is not a
umxtools dependency) with librosa's operations in librosa's order, so the zero pattern, which
defines the bands, is the same.

Shapes: input ``(batch, channels, samples)`` (channels 2 with ``stereo``, else 1); output
``(batch, num_stems, channels, samples)``, the input's length.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from umxtools.models import ModelError
from umxtools.models.roformer import BandSplit, MaskEstimator, Roformer, resolve_stems_channels

# Slaney's mel scale (librosa's htk=False): linear below 1 kHz, logarithmic above
_HZ_PER_MEL = 200.0 / 3
_LOG_START_HZ = 1000.0
_LOG_START_MEL = _LOG_START_HZ / _HZ_PER_MEL
_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mels of frequencies in Hz (float64)."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _HZ_PER_MEL
    high = hz >= _LOG_START_HZ
    return np.where(high, _LOG_START_MEL + np.log(np.where(high, hz, _LOG_START_HZ) / _LOG_START_HZ) / _LOG_STEP, mel)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Frequencies in Hz of Slaney mels (float64)."""
    mel = np.asarray(mel, dtype=np.float64)
    hz = _HZ_PER_MEL * mel
    high = mel >= _LOG_START_MEL
    return np.where(high, _LOG_START_HZ * np.exp(_LOG_STEP * (mel - _LOG_START_MEL)), hz)


def mel_filterbank(sample_rate: float, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Slaney-normalised triangular mel filters ``(n_mels, n_fft // 2 + 1)``, float32.

    Equal to ``librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin,
    fmax=fmax)`` (librosa's defaults ``htk=False, norm="slaney"``): ``n_mels + 2`` edges equally
    spaced in mels from ``fmin`` to ``fmax`` (default Nyquist), filter ``m`` rising from edge
    ``m`` to ``m + 1`` and falling to ``m + 2``, scaled by ``2 / (edge[m + 2] - edge[m])`` Hz.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    bins_hz = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)  # (bins,)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))  # (n_mels + 2,)
    widths = np.diff(edges)
    offsets = edges[:, None] - bins_hz[None, :]  # (n_mels + 2, bins)
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(rising, falling)).astype(np.float32)  # (n_mels, bins)
    # librosa scales the float32 weights in place by a float64 factor: computed in float64, stored as float32
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights


def mel_bands(sample_rate: float, n_fft: int, num_bands: int) -> torch.Tensor:
    """Which bins each band reads: boolean ``(num_bands, n_fft // 2 + 1)``, MSST's rule.

    A bin belongs to a band where its filter is positive; MSST also forces the first bin into the
    first band and the last bin into the last (librosa leaves them at or near zero).
    """
    weights = torch.from_numpy(mel_filterbank(sample_rate, n_fft, num_bands))
    weights[0, 0] = 1.0
    weights[-1, -1] = 1.0
    bands = weights > 0
    uncovered = (~bands.any(dim=0)).nonzero().flatten()
    if len(uncovered):
        raise ModelError(None, f"MelBandRoformer: with num_bands={num_bands}, stft_n_fft={n_fft} and sample_rate={sample_rate}, "
                               f"bin {int(uncovered[0])} is in no band; use fewer bands or a larger stft_n_fft")
    return bands


class MelBandRoformer(Roformer):
    """Mel-band RoFormer with MSST's constructor arguments and ``state_dict`` names.

    Args: as :class:`umxtools.models.bsroformer.BSRoformer`, except
        num_bands: number of mel bands (instead of ``freqs_per_bands``).
        sample_rate: the audio's rate, which places the mel bands.
        mask_estimator_depth: hidden layers per band in each mask estimator (one more linear
            layer than the band-split model's argument of the same value).
        match_input_audio_length: accepted for MSST configs; the output always has the input's
            length here (MSST's default False returns ``(frames - 1) * hop`` samples, the same
            values).
    MSST's mel-band transformers end in their own RMSNorm and there is no final norm.
    Defaults are MSST's (note its dropouts of 0.1).
    """

    kind = "waveform"
    # None here: an MSST checkpoint brings its rule ("msst", its chunk_size) from its config
    # (umxtools.models.foreign), and a model umxtools trains runs whole or on --segment pieces
    segmenting = None

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        stereo: bool | None = None,
        num_stems: int | None = None,
        time_transformer_depth: int = 2,
        freq_transformer_depth: int = 2,
        linear_transformer_depth: int = 0,
        num_bands: int = 60,
        dim_head: int = 64,
        heads: int = 8,
        attn_dropout: float = 0.1,
        ff_dropout: float = 0.1,
        flash_attn: bool = True,
        dim_freqs_in: int = 1025,
        sample_rate: int = 44100,
        stft_n_fft: int = 2048,
        stft_hop_length: int = 512,
        stft_win_length: int = 2048,
        stft_normalized: bool = False,
        mask_estimator_depth: int = 1,
        multi_stft_resolution_loss_weight: float = 1.0,
        multi_stft_resolutions_window_sizes: Sequence[int] = (4096, 2048, 1024, 512, 256),
        multi_stft_hop_size: int = 147,
        multi_stft_normalized: bool = False,
        match_input_audio_length: bool = False,
        mlp_expansion_factor: int = 4,
        use_torch_checkpoint: bool = False,
        skip_connection: bool = False,
        sage_attention: bool = False,
        targets: Sequence[str] | None = None,
        nb_channels: int | None = None,
    ):
        super().__init__()
        num_stems, stereo = resolve_stems_channels("MelBandRoformer", num_stems, stereo, targets, nb_channels)
        self.targets = None if targets is None else list(targets)
        self._init_common(dim=dim, depth=depth, stereo=stereo, num_stems=num_stems,
                          time_transformer_depth=time_transformer_depth, freq_transformer_depth=freq_transformer_depth,
                          linear_transformer_depth=linear_transformer_depth, dim_head=dim_head, heads=heads,
                          attn_dropout=attn_dropout, ff_dropout=ff_dropout, flash_attn=flash_attn, norm_output=True,
                          stft_n_fft=stft_n_fft, stft_hop_length=stft_hop_length, stft_win_length=stft_win_length,
                          stft_normalized=stft_normalized, multi_stft_resolution_loss_weight=multi_stft_resolution_loss_weight,
                          multi_stft_resolutions_window_sizes=multi_stft_resolutions_window_sizes,
                          multi_stft_hop_size=multi_stft_hop_size, multi_stft_normalized=multi_stft_normalized,
                          use_torch_checkpoint=use_torch_checkpoint, skip_connection=skip_connection)
        self.sample_rate = sample_rate
        bands = mel_bands(sample_rate, stft_n_fft, num_bands)  # (bands, bins)
        channels = self.audio_channels
        bins = torch.arange(self.nb_bins).expand(num_bands, -1)[bands]  # every band's bins, band after band
        # index into the (bins, channels) axis: both channels of each bin, channel fastest
        indices = (bins[:, None] * channels + torch.arange(channels)).flatten()
        self.register_buffer("freq_indices", indices, persistent=False)
        # how many bands read each (bin, channel): the estimates of a bin are averaged over them
        self.register_buffer("num_bands_per_freq", bands.sum(dim=0).repeat_interleave(channels), persistent=False)
        sizes = [2 * channels * int(n) for n in bands.sum(dim=1)]  # real and imaginary part of each bin and channel
        self.final_norm = torch.nn.Identity()
        self.band_split = BandSplit(dim, sizes)
        self.mask_estimators = torch.nn.ModuleList(
            MaskEstimator(dim, sizes, hidden_layers=mask_estimator_depth, mlp_expansion_factor=mlp_expansion_factor)
            for _ in range(num_stems))

    def _band_inputs(self, spec: torch.Tensor) -> torch.Tensor:
        return spec[:, self.freq_indices].transpose(1, 2).flatten(2)  # (batch, frames, band bins * channels * 2)

    def _apply_masks(self, spec: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        nb_samples, nb_stems, _, nb_frames = masks.shape
        summed = masks.new_zeros(nb_samples, nb_stems, spec.shape[2], nb_frames).index_add_(2, self.freq_indices, masks)
        averaged = summed / self.num_bands_per_freq.to(spec.real.dtype)[:, None]  # (batch, stems, bins * channels, frames)
        return spec * averaged
