"""BS-RoFormer: band-split RoPE transformer (Lu et al., arXiv:2309.02612), MSST's checkpoint format.

The STFT bins are cut into contiguous bands of ``freqs_per_bands`` bins (MSST's default: 62
bands over the 1025 bins of a 2048-point STFT, narrow at low frequencies); every band gets its
own input projection and mask estimator. Blocks and STFT are :mod:`umxtools.models.roformer`'s.

Shapes: input ``(batch, channels, samples)`` (channels 2 with ``stereo``, else 1); output
``(batch, num_stems, channels, samples)``, the input's length.
"""

from __future__ import annotations

from typing import Sequence

import torch

from umxtools.models import ModelError
from umxtools.models.roformer import BandSplit, MaskEstimator, RMSNorm, Roformer, resolve_stems_channels

# MSST's (and the paper's) bands for stft_n_fft=2048: 24 x 2 bins, 12 x 4, 8 x 12, 8 x 24, 8 x 48, 128, 129
DEFAULT_FREQS_PER_BANDS = (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)


class BSRoformer(Roformer):
    """Band-split RoFormer with MSST's constructor arguments and ``state_dict`` names.

    Args (MSST's names; the model section of an MSST YAML config):
        dim: feature width of every band.
        depth: number of (time, frequency) transformer blocks.
        stereo: 2-channel input (default mono); ``num_stems``: number of sources estimated.
        time_transformer_depth, freq_transformer_depth: attention layers per axis and block.
        linear_transformer_depth: cross-covariance attention layers over all (frame, band)
            positions before each block (0: none).
        freqs_per_bands: bins per band, summing to ``stft_n_fft // 2 + 1``.
        dim_head, heads, attn_dropout, ff_dropout: attention sizes and dropouts.
        flash_attn: torch's scaled_dot_product_attention instead of the explicit softmax.
        stft_n_fft, stft_hop_length, stft_win_length, stft_normalized: the model's STFT (Hann).
        mask_estimator_depth: linear layers per band in each mask estimator.
        mlp_expansion_factor: mask estimator hidden width, in multiples of ``dim``.
        multi_stft_*: the multi-resolution STFT term of :meth:`msst_loss`.
        use_torch_checkpoint: recompute activations in backward (less memory).
        skip_connection: add all earlier blocks' outputs to each block's input.
        dim_freqs_in, sage_attention: accepted for MSST configs and ignored (MSST ignores the
            first; SageAttention is a quantised kernel of the same attention: the weights are
            the same, torch's attention is used here).
        targets, nb_channels: umxtools' training passes them; they set ``num_stems`` and
            ``stereo``.

    Not taken: MSST's ``stft_window_fn``/``multi_stft_window_fn`` (Python callables, never in a
    config; Hann windows throughout).
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
        freqs_per_bands: Sequence[int] = DEFAULT_FREQS_PER_BANDS,
        dim_head: int = 64,
        heads: int = 8,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        flash_attn: bool = True,
        dim_freqs_in: int = 1025,
        stft_n_fft: int = 2048,
        stft_hop_length: int = 512,
        stft_win_length: int = 2048,
        stft_normalized: bool = False,
        mask_estimator_depth: int = 2,
        multi_stft_resolution_loss_weight: float = 1.0,
        multi_stft_resolutions_window_sizes: Sequence[int] = (4096, 2048, 1024, 512, 256),
        multi_stft_hop_size: int = 147,
        multi_stft_normalized: bool = False,
        mlp_expansion_factor: int = 4,
        use_torch_checkpoint: bool = False,
        skip_connection: bool = False,
        sage_attention: bool = False,
        targets: Sequence[str] | None = None,
        nb_channels: int | None = None,
    ):
        super().__init__()
        num_stems, stereo = resolve_stems_channels("BSRoformer", num_stems, stereo, targets, nb_channels)
        self.targets = None if targets is None else list(targets)
        self._init_common(dim=dim, depth=depth, stereo=stereo, num_stems=num_stems,
                          time_transformer_depth=time_transformer_depth, freq_transformer_depth=freq_transformer_depth,
                          linear_transformer_depth=linear_transformer_depth, dim_head=dim_head, heads=heads,
                          attn_dropout=attn_dropout, ff_dropout=ff_dropout, flash_attn=flash_attn, norm_output=False,
                          stft_n_fft=stft_n_fft, stft_hop_length=stft_hop_length, stft_win_length=stft_win_length,
                          stft_normalized=stft_normalized, multi_stft_resolution_loss_weight=multi_stft_resolution_loss_weight,
                          multi_stft_resolutions_window_sizes=multi_stft_resolutions_window_sizes,
                          multi_stft_hop_size=multi_stft_hop_size, multi_stft_normalized=multi_stft_normalized,
                          use_torch_checkpoint=use_torch_checkpoint, skip_connection=skip_connection)
        bands = [int(n) for n in freqs_per_bands]
        if len(bands) < 2 or min(bands) < 1 or sum(bands) != self.nb_bins:
            raise ModelError(None, f"BSRoformer: freqs_per_bands must be 2 or more positive band sizes summing to "
                                   f"stft_n_fft // 2 + 1 = {self.nb_bins}; they sum to {sum(bands)} over {len(bands)} bands")
        self.freqs_per_bands = bands
        sizes = [2 * n * self.audio_channels for n in bands]  # real and imaginary part of each bin and channel
        self.final_norm = RMSNorm(dim)
        self.band_split = BandSplit(dim, sizes)
        self.mask_estimators = torch.nn.ModuleList(
            MaskEstimator(dim, sizes, hidden_layers=mask_estimator_depth - 1, mlp_expansion_factor=mlp_expansion_factor)
            for _ in range(num_stems))

    def _band_inputs(self, spec: torch.Tensor) -> torch.Tensor:
        return spec.transpose(1, 2).flatten(2)  # (batch, frames, bins * channels * 2)

    def _apply_masks(self, spec: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return spec * masks  # (batch, stems, bins * channels, frames)
