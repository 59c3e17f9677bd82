"""BSSEval v4 scores exactly as museval computes them, vectorised in torch.

museval 0.4.1's ``evaluate(references, estimates, win=44100, hop=44100, mode="v4")`` scores every
estimate against its reference in 1 s frames with the "images" decomposition of Vincent et al.
(IEEE TASLP 2006) and the SiSEC 2018 change (Liutkus et al., LVA/ICA 2018): the 512-tap
distortion filters are fitted once over the whole track, then every frame is projected with them.
This module computes the same numbers by the same mathematics, batched over targets, channels and
frames:

1. inner products of every reference channel, delayed by up to 511 samples, with every reference
   and estimate channel, over the whole track: block FFTs whose cross-spectra are summed;
2. the Gram system of the delayed references, ``(targets * channels * 512)`` square, solved once
   for all estimates (museval solves it once per target), and the small systems of each target's
   own reference, solved as one batch;
3. per chunk of frames: the spectra of the references and estimates, their projections through
   the filters (one batched matrix product per frequency bin) and the energies of museval's error
   terms (Parseval).

The lower-level numerical part (the correlations, the Gram system and its solver, the frame
kernels) is in :mod:`umxtools.metrics_kernels`. docs/metrics.md maps each step to museval's
functions and says where the numbers can differ.

Shapes: ``references`` and ``estimates`` are ``(targets, samples, channels)``, museval's layout
(``(targets, samples)`` is mono). Scores are ``(targets, frames)`` float64, NaN in frames where a
reference or an estimate is silent. Computation is float64 on the device of the input tensors
(numpy input: the CPU). Memory beyond the inputs: the Gram matrix (134 MB for 4 stereo targets),
chunks of frames (330 MB of buffers for 4 stereo targets), and the frames' spectra between the
two passes (up to _KEEP_BYTES).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from umxtools.metrics_kernels import (
    _bins_first,
    _channel_copies,
    _chunk_size,
    _distortion_filters,
    _fast_fft_size,
    _frames,
    _time_stats,
    _track_correlations,
)
from umxtools.metrics_kernels import _solve as _solve  # tests call metrics._solve

#: museval's ``bss_eval`` filter length (taps of the distortion filters).
FILTERS_LEN = 512
#: museval.evaluate's defaults at 44.1 kHz: 1 s windows, 1 s hops.
WINDOW = 44100
HOP = 44100
#: the four scores, in museval.evaluate's return order.
SCORES = ("sdr", "isr", "sir", "sar")

# Block length of the whole-track correlations where the frames are not the blocks, and the
# shortest frame used as a block (shorter blocks make the per-bin products overhead-bound)
_BLOCK = 44100
_MIN_BLOCK = 8192
# complex values per array in a chunk of frames of the last step, whose buffers are reused
# (4 stereo targets: 23 frames, 330 MB of buffers). Measured on one core of the 2-core machine,
# 60 s tracks, medians of 3: 2**21, 2**22, 2**23 took 4.4, 4.4 and 3.9 s
_FRAME_CHUNK_VALUES = 2**23
# The first pass keeps the frames' spectra for the second when they take at most this many bytes
# (4 stereo targets: 5.8 MB per second of audio, so tracks up to about 6 minutes); longer tracks
# are transformed twice (measured at 120 s: 10-20 % slower)
_KEEP_BYTES = 2**31


def bss_eval_v4(
    references,
    estimates,
    window: int = WINDOW,
    hop: int = HOP,
    device: str | torch.device | None = None,
) -> dict[str, np.ndarray | torch.Tensor]:
    """museval's BSSEval v4 frame scores (whole-track distortion filters, images mode).

    Args:
        references: ``(targets, samples, channels)`` true sources, or ``(targets, samples)`` for
            mono; a numpy array or a torch tensor of any real dtype.
        estimates: the same shape; estimate ``j`` is scored against reference ``j``.
        window: frame length in samples (museval's ``win``). ``np.inf``, or a window of at
            least ``samples``, gives one frame over the whole track (the hop may be ``np.inf``
            then), as in museval.
        hop: frame hop in samples. Frames start at ``t * hop`` and are ``window`` long; samples
            after the last whole frame are not scored (museval's ``Framing``).
        device: where to compute; defaults to the device of ``references`` (numpy: the CPU).

    Returns:
        ``{"sdr", "isr", "sir", "sar"}``, each ``(targets, frames)`` float64 in dB: numpy arrays
        for numpy input, tensors on ``device`` for tensor input. A frame in which any reference
        or any estimate is silent (its channel sum is zero at every sample: museval's rule) is
        NaN for every target; a zero error energy gives ``+inf``.

    Raises:
        ValueError: shapes that differ or are not 2- or 3-D, non-finite values, a reference or
            estimate that is silent over the whole track (museval raises too), a window or hop
            that is neither a whole number of samples >= 1 nor ``np.inf`` where allowed.
    """
    refs, ests = _prepare(references, estimates, device)
    _check_not_silent(refs, ests)
    scores = _bss_eval_v4(refs, ests, window, hop)
    if not isinstance(references, torch.Tensor):
        return {name: value.cpu().numpy() for name, value in scores.items()}
    return scores


def evaluate(references, estimates, win: int = WINDOW, hop: int = HOP, mode: str = "v4", padding: bool = True):
    """Drop-in for ``museval.evaluate``: the same arguments and ``(SDR, ISR, SIR, SAR)`` return.

    Args:
        references: ``(targets, samples, channels)`` array-like; a list of ``(samples,
            channels)`` arrays is stacked, as museval's ``np.array`` does.
        estimates: ``(targets, samples_est, channels)`` array-like.
        win, hop: frame length and hop in samples; ``win=np.inf`` is one frame over the whole
            track (see :func:`bss_eval_v4`).
        mode: ``"v4"`` only (museval's default; museval's ``"v3"`` refits the filters in every
            frame and is not implemented here: use museval for it).
        padding: museval's ``pad_or_truncate``: estimates shorter than the references are
            zero-padded at the end, longer ones cut.

    Returns:
        ``(SDR, ISR, SIR, SAR)``, each a ``(targets, frames)`` float64 numpy array.
    """
    if mode != "v4":
        raise ValueError(f"mode {mode!r} is not implemented here, only 'v4' (museval's default)")
    references = _stack(references)
    estimates = _stack(estimates)
    if padding and references.ndim == 3 and estimates.ndim == 3:
        estimates = _pad_or_truncate(estimates, references.shape[1])
    refs, ests = _prepare(references, estimates, None)
    _check_not_silent(refs, ests)
    scores = _bss_eval_v4(refs, ests, win, hop)
    return tuple(scores[name].cpu().numpy() for name in SCORES)


def sdr_v4(references, estimates, window: int = WINDOW, hop: int = HOP) -> torch.Tensor:
    """museval's v4 SDR per frame without fitting filters: ``(targets, frames)`` float64 tensor.

    In the images decomposition the SDR's error is the sum of the spatial, interference and
    artifact terms, which is ``estimate - reference`` whatever the filters are: the v4 SDR is
    the framewise ``10 log10(|s|^2 / |e - s|^2)`` with museval's silent-frame NaN rule. It costs
    O(samples), runs on the inputs' device, is differentiable for tensors and equals
    ``bss_eval_v4(...)["sdr"]`` (tested): a fast SDR for your own validation or loss code
    (``umxtools train`` does not call it).

    Shapes and frames as :func:`bss_eval_v4`; a silent track gives NaN frames, not an error.
    """
    refs, ests = _prepare(references, estimates, None)
    nb_targets, nb_samples, nb_channels = refs.shape
    frame_len, nb_frames, hop = _framing(nb_samples, window, hop)
    refs = refs.to(torch.float64).unfold(1, frame_len, hop)[:, :nb_frames]  # (targets, frames, channels, frame_len)
    ests = ests.to(torch.float64).unfold(1, frame_len, hop)[:, :nb_frames]
    sdr = _db(refs.square().sum(dim=(2, 3)), (ests - refs).square().sum(dim=(2, 3)))
    silent = _silent_frames(refs) | _silent_frames(ests)  # (frames,)
    return sdr.masked_fill(silent[None, :], math.nan)


def median_sdr(references, estimates, window: int = WINDOW, hop: int = HOP) -> torch.Tensor:
    """Median over frames of :func:`sdr_v4`, NaN frames left out: ``(targets,)`` float64.

    museval's per-track summary (its ``TrackStore`` aggregates frames with ``np.nanmedian``:
    an even count averages the two middle values, as here). NaN where every frame is NaN.
    """
    return torch.nanquantile(sdr_v4(references, estimates, window, hop), 0.5, dim=1)


# --- the computation --------------------------------------------------------------------------
# Inside, audio is read in pieces as ``(2 * sources, samples)`` float64: the references' then the
# estimates' channels, ``sources = targets * channels`` flattened target-major (museval's (target,
# channel) order). Spectra are rearranged to ``(bins, blocks, 2 * sources)`` so that every per-bin
# product is one batched matrix product.


def _bss_eval_v4(refs: torch.Tensor, ests: torch.Tensor, window: int, hop: int) -> dict[str, torch.Tensor]:
    """Scores of validated ``(targets, samples, channels)`` tensors; see :func:`bss_eval_v4`."""
    nb_targets, nb_samples, nb_channels = refs.shape
    nb_sources = nb_targets * nb_channels
    taps = FILTERS_LEN
    frame_len, nb_frames, hop = _framing(nb_samples, window, hop)

    # 1. The whole-track correlations are summed over blocks. Where the frames tile the track
    # (museval's default, hop == window) the blocks are the frames, and their spectra, held from
    # the first pass when they fit in _KEEP_BYTES, are the frames' spectra of step 3.
    tiled = hop == frame_len and frame_len >= _MIN_BLOCK
    block = frame_len if tiled else _BLOCK
    # one FFT length holds a block's correlations up to taps - 1 lags without wrapping around,
    # and the full linear convolution of a frame with a filter (museval's projections keep the
    # filters' tails: frame_len + taps - 1 samples)
    n_fft = _fast_fft_size(block + taps - 1)
    nb_bins = n_fft // 2 + 1
    keep = tiled and -(-nb_samples // block) * nb_bins * 2 * nb_sources * 16 <= _KEEP_BYTES
    lags, kept, block_stats = _track_correlations(refs, ests, block, n_fft, taps - 1, keep)

    # 2. whole-track filters (taps, sources_in, sources_out): onto all references, and onto
    # each target's own reference (zero between different targets)
    copies = _channel_copies(refs, lags[taps - 1])
    filters_all, filters_own = _distortion_filters(lags, nb_targets, taps, copies)

    # 3. frames: projections and energies, a chunk of frames at a time
    if not tiled:
        n_fft = _fast_fft_size(frame_len + taps - 1)
        nb_bins = n_fft // 2 + 1
    filters = torch.cat([filters_all, filters_own], dim=2)  # (taps, sources, 2 * sources)
    filter_spec = torch.fft.rfft(filters, n=n_fft, dim=0).contiguous()  # (bins, sources, 2 * sources)
    # Parseval with one-sided spectra: sum_n x[n]^2 = sum_k weight[k] |X[k]|^2. The frames'
    # spectra are scaled by sqrt(weight), so every energy below is a plain sum of squares.
    weight = torch.full((nb_bins, 1, 1), 2.0 / n_fft, dtype=torch.float64, device=refs.device)
    weight[0] = 1.0 / n_fft
    if n_fft % 2 == 0:
        weight[-1] = 1.0 / n_fft
    root_weight = weight.sqrt()

    # Every product, difference and square of step 3 is written into buffers allocated once:
    # fresh temporaries of this size cost more in page faults than their arithmetic (measured on
    # the 2-core machine: a difference of two 14 MB arrays took 17 ms into a new array, 5.6 ms
    # into a reused one), and with reused buffers a chunk can hold more frames, which makes the
    # per-bin products less overhead-bound.
    chunk = _chunk_size(nb_bins, 2 * nb_sources, _FRAME_CHUNK_VALUES)
    size = nb_bins * min(chunk, nb_frames) * nb_sources
    proj_buffer = torch.empty(2 * size, dtype=torch.complex128, device=refs.device)
    diff_buffer = torch.empty(size, dtype=torch.complex128, device=refs.device)
    square_buffer = torch.empty(4 * size, dtype=torch.float64, device=refs.device)

    def energy(spec: torch.Tensor) -> torch.Tensor:  # contiguous (bins, frames, n) complex -> (frames, n)
        parts = torch.view_as_real(spec).reshape(nb_bins, -1)  # (bins, frames * n * 2)
        squares = torch.mul(parts, parts, out=square_buffer[:parts.numel()].view(parts.shape))
        return squares.sum(dim=0).reshape(spec.shape[1], spec.shape[2], 2).sum(dim=2)

    def error_energy(spec: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:  # |spec - approx|^2
        return energy(torch.sub(spec, approx, out=diff_buffer[:spec.numel()].view(spec.shape)))

    def per_target(value: torch.Tensor) -> torch.Tensor:  # (frames, sources) -> (frames, targets)
        return value.reshape(value.shape[0], nb_targets, -1).sum(dim=2)

    scores = {name: torch.empty(nb_frames, nb_targets, dtype=torch.float64, device=refs.device) for name in SCORES}
    for first in range(0, nb_frames, chunk):
        frames = slice(first, min(first + chunk, nb_frames))
        nb_chunk = frames.stop - frames.start
        if kept is not None:
            spec = kept[:, frames]  # (bins, chunk, 2 * sources)
            e_true, e_error, silent = (value[frames] for value in block_stats)
        else:
            audio = _frames(refs, ests, first, nb_chunk, hop, frame_len, n_fft)  # (chunk, 2 * sources, n_fft)
            spec = _bins_first(torch.fft.rfft(audio))
            e_true, e_error, silent = _time_stats(audio[..., :frame_len], nb_targets)
            del audio
        spec.mul_(root_weight)
        ref_spec, est_spec = spec[..., :nb_sources], spec[..., nb_sources:]
        proj = proj_buffer[:nb_bins * nb_chunk * 2 * nb_sources].view(nb_bins, nb_chunk, 2 * nb_sources)
        torch.matmul(ref_spec, filter_spec, out=proj)
        # museval's _project(reference_sources, C) and _project(reference_sources[j], Cj)
        proj_all, proj_own = proj[..., :nb_sources], proj[..., nb_sources:]
        e_proj, e_filt = energy(proj).split(nb_sources, dim=1)  # |s_true + e_spat (+ e_interf)|^2
        if nb_targets == 1:  # one system: museval's two projections are the same numbers
            proj_all, e_proj = proj_own, e_filt
        out = {
            "sdr": _db(per_target(e_true), per_target(e_error)),
            "isr": _db(per_target(e_true), per_target(error_energy(proj_own, ref_spec))),  # e_spat
            "sir": _db(per_target(e_filt), per_target(error_energy(proj_all, proj_own))),  # e_interf
            "sar": _db(per_target(e_proj), per_target(error_energy(est_spec, proj_all))),  # e_artif
        }
        for name in SCORES:
            scores[name][frames] = out[name].masked_fill(silent[:, None], math.nan)
    return {name: value.T.contiguous() for name, value in scores.items()}


# --- helpers ----------------------------------------------------------------------------------


def _prepare(references, estimates, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, samples, channels)`` tensors on ``device`` (their own dtype), validated."""
    if device is None:
        device = references.device if isinstance(references, torch.Tensor) else "cpu"
    refs = _as_tensor(references, device)
    ests = _as_tensor(estimates, device)
    if refs.shape != ests.shape:
        raise ValueError(
            f"references {tuple(refs.shape)} and estimates {tuple(ests.shape)} must have the same "
            "(targets, samples, channels) shape"
        )
    if refs.ndim == 2:
        refs, ests = refs[..., None], ests[..., None]  # (targets, samples): mono
    if refs.ndim != 3 or refs.numel() == 0:
        raise ValueError(f"expected (targets, samples, channels) audio, got shape {tuple(refs.shape)}")
    return refs, ests


def _check_not_silent(refs: torch.Tensor, ests: torch.Tensor) -> None:
    """museval's ``validate``: BSSEval is undefined for a source that is silent throughout."""
    for name, value in (("reference", refs), ("estimate", ests)):
        channel_sum = value[..., 0]
        for channel in range(1, value.shape[2]):
            channel_sum = channel_sum + value[..., channel]
        silent = (channel_sum == 0).all(dim=1)  # (targets,)
        if bool(silent.any()):
            raise ValueError(
                f"{name} {int(silent.nonzero()[0, 0])} is silent over the whole track: BSSEval is "
                "undefined for it (museval refuses it too)"
            )


def _as_tensor(value, device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(np.asarray(value))
    if not (value.is_floating_point() or value.dtype in (torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"expected real audio samples, got dtype {value.dtype}")
    return value.to(device)


def _stack(value):
    """museval.evaluate's ``np.array(...)`` of a list of per-target arrays; tensors unchanged."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value
    return np.stack([np.asarray(item) for item in value])


def _pad_or_truncate(estimates, nb_samples: int):
    """museval's ``pad_or_truncate``: estimates cut or zero-padded at the end to ``nb_samples``."""
    nb_est = estimates.shape[1]
    if nb_est >= nb_samples:
        return estimates[:, :nb_samples]
    if isinstance(estimates, torch.Tensor):
        return torch.nn.functional.pad(estimates, (0, 0, 0, nb_samples - nb_est))
    return np.pad(estimates, [(0, 0), (0, nb_samples - nb_est), (0, 0)])


def _framing(nb_samples: int, window: float, hop: float) -> tuple[int, int, int]:
    """(frame length, number of frames, hop) of museval's ``Framing``, as whole numbers.

    ``window`` of ``np.inf`` or of at least ``nb_samples`` is one frame over the whole signal, as
    in museval (its ``bss_eval_sources`` and ``bss_eval_images`` pass ``window=hop=np.inf``); the
    hop, which may then be ``np.inf`` too, is not used. Otherwise both must be whole numbers >= 1
    (museval takes fractional ones and rounds the frame bounds down; no umxtools caller needs that).
    """
    def whole(value) -> bool:
        return math.isfinite(value) and int(value) == value and value >= 1

    one_frame = window == math.inf or (whole(window) and window >= nb_samples)
    if not (whole(window) or one_frame) or not (whole(hop) or (one_frame and hop == math.inf)):
        raise ValueError(
            f"window and hop must be whole numbers of samples >= 1 (np.inf for a window over the whole "
            f"signal), got {window} and {hop}"
        )
    if one_frame:
        return nb_samples, 1, nb_samples if hop == math.inf else int(hop)
    window, hop = int(window), int(hop)
    return window, (nb_samples - window + hop) // hop, hop


def _silent_frames(frames: torch.Tensor) -> torch.Tensor:
    """``(frames,)``: some target's channel sum is zero at every sample of the frame (museval's
    ``_any_source_silent``). ``frames``: ``(targets, frames, channels, frame_len)``."""
    return (frames.sum(dim=2) == 0).all(dim=2).any(dim=0)


def _db(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """museval's ``_safe_db``: ``10 log10(num / den)``, ``+inf`` where ``den`` is exactly 0."""
    return torch.where(den == 0, math.inf, 10 * torch.log10(num / den))
