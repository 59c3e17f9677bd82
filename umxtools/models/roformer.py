"""What the band-split and mel-band RoFormers share: blocks, axial transformer, STFT, loss.

References: W.-T. Lu, J.-C. Wang, Q. Kong, Y.-N. Hung, "Music Source Separation with Band-Split
RoPE Transformer" (arXiv:2309.02612) and J.-C. Wang, W.-T. Lu, M. Won, "Mel-Band RoFormer for
Music Source Separation" (arXiv:2310.01809). Published weights come from ZFTurbo's
Music-Source-Separation-Training (MSST, ``models/bs_roformer/``), itself based on lucidrains'
BS-RoFormer; :mod:`umxtools.models.bsroformer` and :mod:`umxtools.models.melroformer` keep MSST's
constructor argument names and module tree, so a published ``.ckpt`` state dict loads as it is.
The module *names* below (``to_qkv``, ``to_gates``, ``net``, ``to_features``, ``to_freqs``,
``gamma``, the Sequential indices) are therefore part of the checkpoint format, not style.

The model: STFT of every channel; the bins of each band (with real/imaginary parts and channels)
projected to ``dim`` features; ``depth`` blocks that attend along time within each band, then
along bands within each frame (rotary positions on both axes); one mask estimator per stem
giving a complex mask per bin; masked STFT back to audio.

Axes: audio ``(batch, channels, samples)``; complex STFT ``(batch, bins * channels, frames)``
with channels varying fastest (MSST's ``(f s)`` order, so one band holds both channels of its
bins); features ``(batch, frames, bands, dim)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from umxtools.models import ModelError


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit L2 norm over the last axis, computed in float32 for half-precision inputs."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.normalize(x.float(), dim=-1).to(x.dtype)
    return F.normalize(x, dim=-1)


class RMSNorm(nn.Module):
    """``x / ||x|| * sqrt(dim) * gamma`` over the last axis (MSST's norm: F.normalize's epsilon,
    no other)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _l2_normalize(x) * self.scale * self.gamma


class RotaryEmbedding(nn.Module):
    """Rotary positions (Su et al., arXiv:2104.09864) as rotary-embedding-torch 0.6 applies them.

    ``freqs`` ``(dim // 2,)`` is ``10000 ** (-2i / dim)``; position ``p`` turns feature pair ``i``
    by ``p * freqs[i]``. The pairs are *adjacent* features ``(x[2i], x[2i+1])`` (each angle
    repeated twice, not the two halves of the vector), rotated as ``x * cos + (-x[2i+1], x[2i])
    * sin``. Angles are computed in float32 whatever the input dtype, as the reference does.
    ``freqs`` is stored (MSST checkpoints carry it, as a frozen parameter) but never trained.
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        exponents = torch.arange(0, dim, 2)[: dim // 2].float() / dim
        self.register_buffer("freqs", 1.0 / theta ** exponents)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., seq, dim)`` -> the same, each position turned by its angles."""
        positions = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
        angles = (positions[:, None] * self.freqs.float()).repeat_interleave(2, dim=-1)  # (seq, dim)
        pairs = x.unflatten(-1, (-1, 2))  # (..., seq, dim / 2, 2)
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (..., seq, dim)
        return (x * angles.cos() + turned * angles.sin()).to(x.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, flash: bool,
            scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over ``(batch, heads, seq, d)``; scale defaults to ``d ** -0.5``.

    ``flash`` uses torch's scaled_dot_product_attention (MSST's ``flash_attn``), else the explicit
    product; both agree to float rounding.
    """
    if flash:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    weights = (q @ k.transpose(-1, -2) * scale).softmax(dim=-1)  # (batch, heads, seq, seq)
    return F.dropout(weights, dropout) @ v


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with rotary positions and a sigmoid gate per head.

    ``(batch, seq, dim)`` -> ``(batch, seq, dim)``.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, rotary_embed: RotaryEmbedding | None,
                 flash: bool):
        super().__init__()
        self.heads, self.dropout, self.flash = heads, dropout, flash
        self.rotary_embed = rotary_embed  # shared by every time (or frequency) layer of the model
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_gates = nn.Linear(dim, heads)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nb_samples, seq, _ = x.shape
        x = self.norm(x)
        # the projection's features are (q|k|v, head, d), outermost first
        q, k, v = self.to_qkv(x).view(nb_samples, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (batch, heads, seq, d)
        if self.rotary_embed is not None:
            q, k = self.rotary_embed.rotate(q), self.rotary_embed.rotate(k)
        out = _attend(q, k, v, self.dropout if self.training else 0.0, self.flash)
        gates = self.to_gates(x).transpose(1, 2).unsqueeze(-1).sigmoid()  # (batch, heads, seq, 1)
        out = (out * gates).transpose(1, 2).reshape(nb_samples, seq, -1)  # (batch, seq, heads * d)
        return self.to_out(out)


class _SplitFeatureHeads(nn.Module):
    """``(batch, seq, 3 * heads * d)`` -> q, k, v, each ``(batch, heads, d, seq)``."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nb_samples, seq, _ = x.shape
        return x.view(nb_samples, seq, 3, self.heads, -1).permute(2, 0, 3, 4, 1)


class _MergeFeatureHeads(nn.Module):
    """``(batch, heads, d, seq)`` -> ``(batch, seq, heads * d)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).flatten(2)


class LinearAttention(nn.Module):
    """Cross-covariance attention (El-Nouby et al., XCiT, arXiv:2106.09681): each head attends
    between its ``d`` feature channels, so the cost is linear in the sequence length. Queries and
    keys are L2-normalised along the sequence; a learned temperature per head scales the queries
    and the logits are scaled by 8 (MSST's ``linear_transformer_depth`` layers).

    ``(batch, seq, dim)`` -> ``(batch, seq, dim)``.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, flash: bool, scale: float = 8.0):
        super().__init__()
        self.dropout, self.flash, self.scale = dropout, flash, scale
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Sequential(nn.Linear(dim, 3 * heads * dim_head, bias=False), _SplitFeatureHeads(heads))
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.to_out = nn.Sequential(_MergeFeatureHeads(), nn.Linear(heads * dim_head, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_qkv(self.norm(x))  # (batch, heads, d, seq)
        q, k = _l2_normalize(q), _l2_normalize(k)
        q = q * self.temperature.exp()
        out = _attend(q, k, v, self.dropout if self.training else 0.0, self.flash, scale=self.scale)
        return self.to_out(out)


class FeedForward(nn.Module):
    """Pre-norm GELU MLP with a 4x (``mult``) hidden layer. ``(..., dim)`` -> ``(..., dim)``."""

    def __init__(self, dim: int, mult: float = 4, dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(RMSNorm(dim), nn.Linear(dim, inner), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """``depth`` residual (attention, feed-forward) pairs, then an optional output RMSNorm.

    ``(batch, seq, dim)`` -> ``(batch, seq, dim)``. MSST's band-split model leaves the output
    norm out (it normalises once after all blocks); its mel-band model keeps it.
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, attn_dropout: float, ff_dropout: float,
                 flash_attn: bool, norm_output: bool, rotary_embed: RotaryEmbedding | None = None, linear_attn: bool = False):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            if linear_attn:
                attn = LinearAttention(dim, heads, dim_head, attn_dropout, flash_attn)
            else:
                attn = Attention(dim, heads, dim_head, attn_dropout, rotary_embed, flash_attn)
            self.layers.append(nn.ModuleList([attn, FeedForward(dim, dropout=ff_dropout)]))
        self.norm = RMSNorm(dim) if norm_output else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class BandSplit(nn.Module):
    """One RMSNorm + linear map per band, from its ``sizes[b]`` inputs to ``dim`` features.

    ``(batch, frames, sum(sizes))`` -> ``(batch, frames, bands, dim)``.
    """

    def __init__(self, dim: int, sizes: Sequence[int]):
        super().__init__()
        self.sizes = list(sizes)
        self.to_features = nn.ModuleList(nn.Sequential(RMSNorm(n), nn.Linear(n, dim)) for n in self.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bands = x.split(self.sizes, dim=-1)
        return torch.stack([net(band) for band, net in zip(bands, self.to_features)], dim=-2)


def _mlp(dim_in: int, dim_out: int, dim_hidden: int, hidden_layers: int) -> nn.Sequential:
    """Linear layers with tanh between them, ``hidden_layers`` of width ``dim_hidden``."""
    dims = [dim_in, *[dim_hidden] * hidden_layers, dim_out]
    layers: list[nn.Module] = []
    for index, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if index:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class MaskEstimator(nn.Module):
    """One MLP + GLU per band, from ``dim`` features back to the band's ``sizes[b]`` values
    (real and imaginary parts of its bins and channels).

    ``(batch, frames, bands, dim)`` -> ``(batch, frames, sum(sizes))``. ``hidden_layers`` is
    ``mask_estimator_depth - 1`` in MSST's band-split model and ``mask_estimator_depth`` in its
    mel-band model (their ``MLP`` helpers differ by one layer).
    """

    def __init__(self, dim: int, sizes: Sequence[int], hidden_layers: int, mlp_expansion_factor: int = 4):
        super().__init__()
        self.to_freqs = nn.ModuleList(nn.Sequential(_mlp(dim, 2 * n, dim * mlp_expansion_factor, hidden_layers), nn.GLU(dim=-1))
                                      for n in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(band) for band, net in zip(x.unbind(dim=-2), self.to_freqs)], dim=-1)


def resolve_stems_channels(cls_name: str, num_stems: int | None, stereo: bool | None, targets: Sequence[str] | None,
                           nb_channels: int | None) -> tuple[int, bool]:
    """``(num_stems, stereo)`` from MSST's arguments or umxtools' ``targets``/``nb_channels``.

    umxtools' training offers ``targets`` and ``nb_channels``; they set ``num_stems`` and
    ``stereo`` (MSST's defaults: 1 stem, mono), and an explicit value that disagrees is an error.
    """
    if targets is not None:
        if num_stems is not None and num_stems != len(targets):
            raise ModelError(None, f"{cls_name}: num_stems={num_stems} but {len(targets)} targets ({', '.join(targets)})")
        num_stems = len(targets)
    if nb_channels is not None:
        if nb_channels not in (1, 2):
            raise ModelError(None, f"{cls_name}: nb_channels must be 1 or 2, not {nb_channels}")
        if stereo is not None and bool(stereo) != (nb_channels == 2):
            raise ModelError(None, f"{cls_name}: stereo={stereo} contradicts nb_channels={nb_channels}")
        stereo = nb_channels == 2
    num_stems = 1 if num_stems is None else int(num_stems)
    if num_stems < 1:
        raise ModelError(None, f"{cls_name}: num_stems must be at least 1, not {num_stems}")
    return num_stems, bool(stereo)


class Roformer(nn.Module):
    """The shared skeleton of :class:`BSRoformer` and :class:`MelBandRoformer`.

    Subclasses build ``band_split``, ``mask_estimators`` and ``final_norm``, and define which
    STFT values each band reads (:meth:`_band_inputs`) and how masks meet the STFT
    (:meth:`_apply_masks`). Each subclass declares the model contract (``kind``, ``segmenting``).
    """

    def _init_common(self, *, dim: int, depth: int, stereo: bool, num_stems: int, time_transformer_depth: int,
                     freq_transformer_depth: int, linear_transformer_depth: int, dim_head: int, heads: int,
                     attn_dropout: float, ff_dropout: float, flash_attn: bool, norm_output: bool, stft_n_fft: int,
                     stft_hop_length: int, stft_win_length: int, stft_normalized: bool,
                     multi_stft_resolution_loss_weight: float, multi_stft_resolutions_window_sizes: Sequence[int],
                     multi_stft_hop_size: int, multi_stft_normalized: bool, use_torch_checkpoint: bool,
                     skip_connection: bool) -> None:
        self.stereo, self.audio_channels, self.num_stems = stereo, 2 if stereo else 1, num_stems
        self.use_torch_checkpoint, self.skip_connection = use_torch_checkpoint, skip_connection
        if stft_win_length > stft_n_fft:
            raise ModelError(None, f"{type(self).__name__}: stft_win_length {stft_win_length} exceeds stft_n_fft {stft_n_fft}")
        self.n_fft, self.hop_length, self.win_length, self.normalized = stft_n_fft, stft_hop_length, stft_win_length, stft_normalized
        self.nb_bins = stft_n_fft // 2 + 1
        common = dict(dim=dim, heads=heads, dim_head=dim_head, attn_dropout=attn_dropout, ff_dropout=ff_dropout,
                      flash_attn=flash_attn, norm_output=norm_output)
        # one rotary table per axis, shared by every block (MSST's checkpoints repeat it in each)
        time_rotary, freq_rotary = RotaryEmbedding(dim_head), RotaryEmbedding(dim_head)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            block = []
            if linear_transformer_depth > 0:
                block.append(Transformer(depth=linear_transformer_depth, linear_attn=True, **common))
            block.append(Transformer(depth=time_transformer_depth, rotary_embed=time_rotary, **common))
            block.append(Transformer(depth=freq_transformer_depth, rotary_embed=freq_rotary, **common))
            self.layers.append(nn.ModuleList(block))
        self.multi_stft_resolution_loss_weight = multi_stft_resolution_loss_weight
        self.multi_stft_resolutions_window_sizes = tuple(multi_stft_resolutions_window_sizes)
        self.multi_stft_hop_size, self.multi_stft_normalized = multi_stft_hop_size, multi_stft_normalized

    # --- STFT ------------------------------------------------------------------------------------

    def _window(self, like: torch.Tensor) -> torch.Tensor:
        return torch.hann_window(self.win_length, device=like.device, dtype=like.dtype)

    def _stft(self, audio: torch.Tensor) -> torch.Tensor:
        """``(batch, channels, samples)`` -> real view ``(batch, bins * channels, frames, 2)``.

        torch.stft with MSST's settings: periodic Hann window of ``stft_win_length``, centred
        (reflect padding), ``stft_normalized`` scaling.
        """
        nb_samples, nb_channels, length = audio.shape
        spec = torch.stft(audio.reshape(-1, length), self.n_fft, self.hop_length, self.win_length, self._window(audio),
                          normalized=self.normalized, return_complex=True)  # (batch * channels, bins, frames)
        spec = torch.view_as_real(spec).view(nb_samples, nb_channels, self.nb_bins, -1, 2)
        return spec.transpose(1, 2).reshape(nb_samples, self.nb_bins * nb_channels, -1, 2)

    def _istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        """Complex ``(batch, stems, bins * channels, frames)`` -> ``(batch, stems, channels, length)``.

        The output is cut (or zero-padded) to the input's length, as MSST's band-split model does;
        without ``length`` torch.istft returns ``(frames - 1) * hop`` samples, the same values.
        """
        nb_samples, nb_stems, _, nb_frames = spec.shape
        spec = spec.view(nb_samples, nb_stems, self.nb_bins, self.audio_channels, nb_frames).transpose(2, 3)
        window = torch.hann_window(self.win_length, device=spec.device, dtype=spec.real.dtype)
        audio = torch.istft(spec.reshape(-1, self.nb_bins, nb_frames), self.n_fft, self.hop_length, self.win_length, window,
                            normalized=self.normalized, length=length)  # (batch * stems * channels, length)
        return audio.view(nb_samples, nb_stems, self.audio_channels, length)

    # --- the network -------------------------------------------------------------------------------

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_torch_checkpoint and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)  # activations recomputed in backward
        return module(x)

    def _axial(self, x: torch.Tensor) -> torch.Tensor:
        """The ``depth`` blocks: time attention within each band, then band attention within each
        frame. ``(batch, frames, bands, dim)`` -> the same.

        ``skip_connection`` (MSST) adds the outputs of all earlier blocks to each block's input.
        """
        nb_samples, nb_frames, nb_bands, dim = x.shape
        outputs: list[torch.Tensor] = []
        for block in self.layers:
            if len(block) == 3:  # linear attention over all (frame, band) positions at once
                x = self._run(block[0], x.reshape(nb_samples, -1, dim)).view(nb_samples, nb_frames, nb_bands, dim)
            time_transformer, freq_transformer = block[-2], block[-1]
            if self.skip_connection:
                for earlier in outputs:
                    x = x + earlier
            x = x.transpose(1, 2).reshape(-1, nb_frames, dim)  # (batch * bands, frames, dim)
            x = self._run(time_transformer, x)
            x = x.view(nb_samples, nb_bands, nb_frames, dim).transpose(1, 2).reshape(-1, nb_bands, dim)  # (batch * frames, bands, dim)
            x = self._run(freq_transformer, x)
            x = x.view(nb_samples, nb_frames, nb_bands, dim)
            if self.skip_connection:
                outputs.append(x)
        return x

    def _band_inputs(self, spec: torch.Tensor) -> torch.Tensor:
        """Real STFT ``(batch, bins * channels, frames, 2)`` -> band split input ``(batch, frames, values)``."""
        raise NotImplementedError

    def _apply_masks(self, spec: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Complex STFT ``(batch, 1, bins * channels, frames)`` and complex masks ``(batch, stems,
        values, frames)`` -> masked STFT ``(batch, stems, bins * channels, frames)``."""
        raise NotImplementedError

    def separate(self, audio: torch.Tensor) -> torch.Tensor:
        """``(batch, channels, samples)`` -> ``(batch, stems, channels, samples)``."""
        if audio.dim() != 3 or audio.shape[1] != self.audio_channels:
            raise ModelError(None, f"{type(self).__name__}(stereo={self.stereo}) takes (batch, {self.audio_channels}, samples), "
                                   f"got {tuple(audio.shape)}")
        length = audio.shape[-1]
        spec = self._stft(audio)  # (batch, bins * channels, frames, 2)
        x = self.band_split(self._band_inputs(spec).to(self._param_dtype()))  # (batch, frames, bands, dim)
        x = self.final_norm(self._axial(x))
        masks = torch.stack([self._run(estimate, x) for estimate in self.mask_estimators], dim=1)  # (batch, stems, frames, values)
        masks = masks.unflatten(-1, (-1, 2)).transpose(2, 3).to(spec.dtype)  # (batch, stems, values / 2, frames, 2)
        spec = self._apply_masks(torch.view_as_complex(spec).unsqueeze(1), torch.view_as_complex(masks.contiguous()))
        return self._istft(spec, length)

    def _param_dtype(self) -> torch.dtype:
        return next(self.band_split.parameters()).dtype

    def forward(self, raw_audio: torch.Tensor, target: torch.Tensor | None = None,
                return_loss_breakdown: bool = False):
        """``(batch, channels, samples)`` -> estimates ``(batch, stems, channels, samples)``.

        Unlike MSST, the stems axis is kept when ``num_stems == 1`` (MSST returns ``(batch,
        channels, samples)`` then), as umxtools' waveform models do. With ``target`` (``(batch,
        stems, channels, samples)``, or without the stems axis for one stem) the result is MSST's
        training loss instead (:meth:`msst_loss`).
        """
        estimate = self.separate(raw_audio)
        if target is None:
            return estimate
        return self.msst_loss(estimate, target, return_loss_breakdown)

    def msst_loss(self, estimate: torch.Tensor, target: torch.Tensor, return_loss_breakdown: bool = False):
        """MSST's loss: mean absolute waveform error plus ``multi_stft_resolution_loss_weight``
        times the sum over ``multi_stft_resolutions_window_sizes`` of the mean absolute complex
        STFT error (Hann window of that size, ``n_fft = max(size, stft_n_fft)``, hop
        ``multi_stft_hop_size``).

        ``estimate``, ``target``: ``(batch, stems, channels, samples)`` (``target`` may omit the
        stems axis for one stem). Returns the total, or ``(total, (waveform, multi_stft))``.
        """
        if target.dim() == estimate.dim() - 1 and self.num_stems == 1:
            target = target.unsqueeze(1)
        if target.shape[:-1] != estimate.shape[:-1]:
            raise ModelError(None, f"{type(self).__name__}: target shape {tuple(target.shape)} does not fit the estimate's "
                                   f"{tuple(estimate.shape)} (batch, stems, channels, samples)")
        target = target[..., :estimate.shape[-1]]
        waveform_loss = F.l1_loss(estimate, target)
        flat_estimate, flat_target = estimate.reshape(-1, estimate.shape[-1]), target.reshape(-1, target.shape[-1])
        multi = estimate.new_zeros(())
        for size in self.multi_stft_resolutions_window_sizes:
            window = torch.hann_window(size, device=estimate.device, dtype=estimate.dtype)
            settings = dict(n_fft=max(size, self.n_fft), hop_length=self.multi_stft_hop_size, win_length=size,
                            window=window, normalized=self.multi_stft_normalized, return_complex=True)
            multi = multi + F.l1_loss(torch.stft(flat_estimate, **settings), torch.stft(flat_target, **settings))
        total = waveform_loss + self.multi_stft_resolution_loss_weight * multi
        return (total, (waveform_loss, multi)) if return_loss_breakdown else total
