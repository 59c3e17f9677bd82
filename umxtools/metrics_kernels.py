"""The numerical kernels behind :mod:`umxtools.metrics`' BSSEval v4: whole-track correlations by
block FFTs, the distortion filters (the Gram system of the delayed references and its solver), and
the frame extraction and statistics of the last step.

Audio is read in pieces as ``(2 * sources, samples)`` float64 (the references' then the
estimates' channels, target-major); spectra are ``(bins, blocks, 2 * sources)``. See
:func:`umxtools.metrics._bss_eval_v4`, which drives these, and docs/metrics.md.
"""

from __future__ import annotations

import numpy as np
import torch

# museval adds np.finfo(float).eps, an absolute value, to the Gram matrix's diagonal
_EPS = float(np.finfo(np.float64).eps)
# complex values per array in a chunk of blocks or frames (16 bytes each: 32 MiB, 5 frames of 4
# stereo targets). Measured on 2 cores, 30 s tracks: chunks of 1, 2, 5, 11 frames took 4.9, 4.0,
# 3.8, 4.5 s: per-bin products of few frames are overhead-bound, larger temporaries page-fault.
_CHUNK_VALUES = 2**21


def _track_correlations(
    refs: torch.Tensor, ests: torch.Tensor, block: int, n_fft: int, max_lag: int, keep: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...]]:
    """Whole-track ``lags[max_lag + k, u, q] = sum_n ref_u[n] * x_q[n + k]`` for ``|k| <= max_lag``.

    ``x`` is the references' then the estimates' channels, all zero outside the track; ``lags``
    is ``(2 * max_lag + 1, sources, 2 * sources)``: museval's whole-track sums (it takes one FFT
    of the whole track per channel), here over consecutive blocks of ``block >= max_lag``
    samples. Within each block, cross-spectra of FFTs of ``n_fft >= block + max_lag`` points (no
    lag wraps around) are summed over all blocks before one inverse FFT; the products that
    straddle a boundary between blocks involve only ``max_lag`` samples on each side and come
    from small FFTs around each boundary. Memory: a chunk of blocks, plus the kept spectra.

    Returns ``lags``; with ``keep``, the spectra of all blocks, ``(bins, blocks, 2 * sources)``
    (then the cross-spectra are one batched product over all blocks at the end, else one per
    chunk: fewer, larger products are faster); and :func:`_time_stats` of every block.
    """
    nb_targets, nb_samples, nb_channels = refs.shape
    nb_sources = nb_targets * nb_channels
    assert block >= max_lag and n_fft >= block + max_lag
    nb_blocks = -(-nb_samples // block)
    nb_bins = n_fft // 2 + 1
    cross = torch.zeros(nb_bins, nb_sources, 2 * nb_sources, dtype=torch.complex128, device=refs.device)
    kept = None
    if keep:
        kept = torch.empty(nb_bins, nb_blocks, 2 * nb_sources, dtype=torch.complex128, device=refs.device)
    stats = []
    chunk = _chunk_size(nb_bins, 2 * nb_sources)
    for first in range(0, nb_blocks, chunk):
        nb_chunk = min(chunk, nb_blocks - first)
        audio = _frames(refs, ests, first, nb_chunk, block, block, n_fft)  # (chunk, 2 * sources, n_fft)
        stats.append(_time_stats(audio[..., :block], nb_targets))
        spec = torch.fft.rfft(audio)  # (chunk, 2 * sources, bins)
        if kept is not None:
            kept[:, first:first + nb_chunk] = spec.permute(2, 0, 1)
        else:
            spec = _bins_first(spec)  # (bins, chunk, 2 * sources)
            cross += torch.matmul(spec[..., :nb_sources].mH, spec)  # (bins, sources, 2 * sources)
    if kept is not None:
        # in slices of bins: the conjugate-transposed operand is materialised by the product
        step = _chunk_size(nb_blocks, nb_sources)
        for low in range(0, nb_bins, step):
            bins = kept[low:low + step]
            cross[low:low + step] = torch.matmul(bins[..., :nb_sources].mH, bins)
    lags = _lags(cross, n_fft, max_lag)

    # products across the boundary b between two blocks: the last max_lag samples before b (the
    # tail) against the first max_lag from b (the head), and the head against the tail, placed
    # where they lie in [b - max_lag, b + max_lag) and correlated with 4 * max_lag points or more
    if nb_blocks > 1:
        size = _fast_fft_size(4 * max_lag)
        nb_small = size // 2 + 1
        cross = torch.zeros(nb_small, nb_sources, 2 * nb_sources, dtype=torch.complex128, device=refs.device)
        offsets = torch.arange(-max_lag, max_lag, device=refs.device)
        boundaries = torch.arange(1, nb_blocks, device=refs.device) * block
        chunk = _chunk_size(2 * nb_small, 2 * nb_sources)
        for first in range(0, len(boundaries), chunk):
            around = _gather(refs, ests, boundaries[first:first + chunk, None] + offsets)
            # (chunk, 2 * sources, 2 * max_lag)
            tail = _bins_first(torch.fft.rfft(around[..., :max_lag], n=size))  # (bins, chunk, 2 * sources)
            head = _bins_first(torch.fft.rfft(torch.nn.functional.pad(around[..., max_lag:], (max_lag, 0)), n=size))
            cross += torch.matmul(tail[..., :nb_sources].mH, head)
            cross += torch.matmul(head[..., :nb_sources].mH, tail)
        lags += _lags(cross, size, max_lag)
    if not bool(torch.isfinite(lags).all()):
        raise ValueError("references or estimates contain NaN or infinite values")
    return lags, kept, tuple(torch.cat(values) for values in zip(*stats))


def _lags(cross: torch.Tensor, n_fft: int, max_lag: int) -> torch.Tensor:
    """Lags ``-max_lag .. max_lag`` of the circular correlations whose ``(bins, P, Q)`` one-sided
    cross-spectra are ``cross``: ``(2 * max_lag + 1, P, Q)`` (circular lag ``j`` is lag ``j``, or
    ``j - n_fft`` past the middle)."""
    circular = torch.fft.irfft(cross.permute(1, 2, 0).contiguous(), n=n_fft)  # (P, Q, n_fft): FFT along memory
    return torch.cat([circular[..., n_fft - max_lag:], circular[..., :max_lag + 1]], dim=-1).permute(2, 0, 1)


def _distortion_filters(
    lags: torch.Tensor, nb_targets: int, taps: int, copies: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares FIR filters from the delayed references to each estimate, whole track.

    museval's ``_compute_reference_correlations`` and ``_compute_projection_filters``: the Gram
    matrix ``G[(u, a), (v, b)] = <ref_u delayed a, ref_v delayed b>`` over reference channels
    ``u, v`` and delays ``a, b < taps`` and ``D[(u, a), e] = <ref_u delayed a, est_e>``, solved
    with ``G + eps I``; and the same restricted to each target's own reference channels.

    ``lags``: :func:`_track_correlations` with ``max_lag = taps - 1``; ``copies``:
    :func:`_channel_copies`. A channel that copies another of the same system is left out of it
    where it makes the system singular (its filters are then zero: a copy adds nothing to the
    span of the delayed references). Returns ``filters_all``
    and ``filters_own``, each ``(taps, sources_in, sources_out)``: ``filters_all[:, u, e]`` maps
    reference channel ``u`` to estimate channel ``e``; ``filters_own`` is zero where ``u`` and
    ``e`` belong to different targets.
    """
    nb_sources = lags.shape[1]
    nb_channels = nb_sources // nb_targets

    # <ref_u delayed a, ref_v delayed b> = sum_n ref_u[n] ref_v[n + a - b]: a Toeplitz block per
    # (u, v), read from a Hankel view (index a + b') flipped along b' = taps - 1 - b
    ref_lags = lags[:, :, :nb_sources].permute(1, 2, 0).contiguous()  # (sources u, sources v, lags)
    nb_lags = 2 * taps - 1
    hankel = ref_lags.as_strided((nb_sources, taps, nb_sources, taps), (nb_sources * nb_lags, 1, nb_lags, 1))
    gram = hankel.flip(3).reshape(nb_sources * taps, nb_sources * taps)  # rows (u, a), columns (v, b)
    # <ref_u delayed a, est_e> = sum_n ref_u[n] est_e[n + a]
    rhs = lags[taps - 1:, :, nb_sources:].transpose(0, 1).reshape(nb_sources * taps, nb_sources)

    # each target's own system: its channels' rows and columns, its estimate's columns
    # (copied before the diagonal of `gram` changes in place)
    block = nb_channels * taps
    gram_own = torch.stack([gram[j * block:(j + 1) * block, j * block:(j + 1) * block] for j in range(nb_targets)])
    rhs_own = torch.stack(
        [rhs[j * block:(j + 1) * block, j * nb_channels:(j + 1) * nb_channels] for j in range(nb_targets)]
    )
    gram.diagonal().add_(_EPS)
    gram_own.diagonal(dim1=1, dim2=2).add_(_EPS)

    redundant = copies != torch.arange(nb_sources, device=copies.device)  # (sources,): copies an earlier one
    filters_all = _solve(gram, rhs, redundant.repeat_interleave(taps)).reshape(nb_sources, taps, nb_sources)
    filters_all = filters_all.transpose(0, 1)
    if nb_targets == 1:
        return filters_all, filters_all  # the own system is the whole system
    own_redundant = torch.stack([_redundant(copies[j * nb_channels:(j + 1) * nb_channels]) for j in range(nb_targets)])
    own = _solve(gram_own, rhs_own, own_redundant.repeat_interleave(taps, dim=1))
    own = own.reshape(nb_targets, nb_channels, taps, nb_channels)
    filters_own = lags.new_zeros((taps, nb_targets, nb_channels, nb_targets, nb_channels))
    for j in range(nb_targets):
        filters_own[:, j, :, j, :] = own[j].transpose(0, 1)
    return filters_all, filters_own.reshape(taps, nb_sources, nb_sources)


def _solve(matrix: torch.Tensor, rhs: torch.Tensor, redundant: torch.Tensor) -> torch.Tensor:
    """Solve the symmetric positive semi-definite system(s) ``matrix @ x = rhs``.

    ``matrix`` ``(..., n, n)``, ``rhs`` ``(..., n, r)``, ``redundant`` ``(..., n)`` bool: rows and
    columns of an exactly repeated channel, left out (their solution is 0): every least-squares
    solution gives the same projections then, museval's LU included, and without them the system
    is not singular. museval calls ``np.linalg.solve`` (LU), and ``np.linalg.lstsq`` where LU finds
    the matrix exactly singular. Here Cholesky: LU's solution to rounding wherever the matrix is
    positive definite in floating point, at half the cost; where it is not, LU; where LU meets an
    exact zero pivot, least squares (SVD, minimum norm, as numpy's ``lstsq``). See
    docs/metrics.md on singular systems.
    """
    if bool(redundant.any()):
        if matrix.ndim > 2:  # a batch: each system on its own
            return torch.stack([_solve(*system) for system in zip(matrix, rhs, redundant)])
        keep = (~redundant).nonzero()[:, 0]
        solution = rhs.new_zeros(rhs.shape)
        solution[keep] = _solve(matrix[keep][:, keep], rhs[keep], redundant[keep])
        return solution
    if matrix.ndim == 2 and matrix.device.type == "cpu":
        solution = _cholesky_solve_lapack(matrix, rhs)
        if solution is not None:
            return solution
    else:
        factor, info = torch.linalg.cholesky_ex(matrix)
        if not bool((info != 0).any()):
            return torch.cholesky_solve(rhs, factor)
    if matrix.ndim > 2:
        return torch.stack([_solve(*system) for system in zip(matrix, rhs, redundant)])
    solution, info = torch.linalg.solve_ex(matrix, rhs)
    if int(info) == 0:
        return solution
    return torch.linalg.lstsq(matrix.cpu(), rhs.cpu(), driver="gelsd").solution.to(rhs.device)


def _cholesky_solve_lapack(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor | None:
    """Cholesky solve of one symmetric CPU system by LAPACK's ``dpotrf``/``dpotrs`` (scipy), or
    None where ``matrix`` is not positive definite in floating point.

    ``matrix`` is overwritten by its factor where it succeeds, and left as it was where it
    fails. ``torch.linalg.cholesky_ex`` copies the matrix and zeroes the other triangle;
    ``dpotrf`` works in place and leaves it: measured on one core of the 2-core machine, 4096
    square, 0.7 s against 1.6 s. A C-contiguous symmetric matrix is its own transpose, so its
    memory is handed to LAPACK as the Fortran-ordered matrix, uncopied.
    """
    from scipy.linalg import lapack  # scipy comes with museval

    matrix = matrix.contiguous()
    diagonal = matrix.diagonal().clone()
    lower = matrix.numpy().T  # Fortran order, the same matrix
    factor, info = lapack.dpotrf(lower, lower=1, clean=0, overwrite_a=1)
    if info != 0:
        # dpotrf wrote (part of) the Fortran lower triangle, the upper one of the C view, and
        # left the strict lower one: restore the matrix for the fallbacks
        strict = matrix.tril(-1)
        matrix.copy_(strict + strict.T).diagonal().copy_(diagonal)
        return None
    solution, info = lapack.dpotrs(factor, rhs.numpy(), lower=1)
    if info != 0:
        return None
    return torch.from_numpy(solution)


def _channel_copies(refs: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
    """``(sources,)``: for each reference channel, the first channel equal to it sample for sample
    (itself if none earlier is).

    An exact copy (a mono stem stored as stereo) makes museval's Gram matrix exactly singular.
    ``energies``: lag-0 inner products ``(sources, >= sources)`` of :func:`_track_correlations`:
    samples are compared only where the energies and the cross term agree.
    """
    nb_targets, _, nb_channels = refs.shape
    nb_sources = nb_targets * nb_channels
    energy = energies[:, :nb_sources].diagonal().tolist()
    cross = energies[:, :nb_sources].tolist()
    copies = list(range(nb_sources))
    for u in range(nb_sources):
        for v in range(u):
            if copies[v] != v or max(abs(energy[u] - energy[v]), abs(cross[u][v] - energy[u])) > 1e-9 * energy[u]:
                continue
            if torch.equal(refs[u // nb_channels, :, u % nb_channels], refs[v // nb_channels, :, v % nb_channels]):
                copies[u] = v
                break
    return torch.tensor(copies, device=refs.device)


def _redundant(copies: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bool: the channels among ``copies`` (:func:`_channel_copies` of the channels of one
    system) equal to an earlier channel of the same system."""
    first = {}
    flags = []
    for label in copies.tolist():
        flags.append(label in first)
        first.setdefault(label, True)
    return torch.tensor(flags, device=copies.device)


def _frames(
    refs: torch.Tensor, ests: torch.Tensor, first: int, count: int, hop: int, length: int, n_fft: int
) -> torch.Tensor:
    """Frames ``first .. first + count - 1`` (frame ``i``: samples ``[i * hop, i * hop + length)``,
    zero past the track's end) of the references' then the estimates' channels, zero-padded to
    ``n_fft``: ``(count, 2 * sources, n_fft)`` float64, from ``(targets, samples, channels)``."""
    nb_targets, nb_samples, nb_channels = refs.shape
    start, stop = first * hop, (first + count - 1) * hop + length
    out = torch.empty(count, 2, nb_targets, nb_channels, n_fft, dtype=torch.float64, device=refs.device)
    out[..., length:] = 0
    for index, audio in enumerate((refs, ests)):
        piece = audio[:, start:min(stop, nb_samples)]  # (targets, samples, channels)
        if stop > nb_samples:
            piece = torch.nn.functional.pad(piece, (0, 0, 0, stop - max(start, nb_samples)))
        out[:, index, :, :, :length] = piece.unfold(1, length, hop).transpose(0, 1)
    return out.reshape(count, 2 * nb_targets * nb_channels, n_fft)


def _time_stats(audio: torch.Tensor, nb_targets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per frame of ``(frames, 2 * sources, length)`` audio (references then estimates): the
    references' energies ``|s_true|^2`` and the errors' ``|estimate - s_true|^2`` per source
    (museval's SDR: ``e_spat + e_interf + e_artif = estimate - s_true``), each ``(frames,
    sources)``, and ``(frames,)`` whether any reference or estimate is silent (its channel sum
    is zero at every sample: museval's ``_any_source_silent``)."""
    nb_frames, nb_signals, length = audio.shape
    ref, est = audio.split(nb_signals // 2, dim=1)
    channel_sum = audio.reshape(nb_frames, 2 * nb_targets, -1, length).sum(dim=2)
    silent = (channel_sum == 0).all(dim=2).any(dim=1)
    return ref.square().sum(dim=2), (est - ref).square().sum(dim=2), silent


def _gather(refs: torch.Tensor, ests: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Samples at ``index`` ``(n, length)`` (zero past the track's end) of the references' then
    the estimates' channels: ``(n, 2 * sources, length)`` float64."""
    nb_targets, nb_samples, nb_channels = refs.shape
    inside = (index < nb_samples).to(torch.float64)[:, None, :]
    index = index.clamp(max=nb_samples - 1)
    parts = [audio[:, index].to(torch.float64).permute(1, 0, 3, 2) for audio in (refs, ests)]
    # (n, targets, channels, length) each
    return torch.cat(parts, dim=1).reshape(index.shape[0], 2 * nb_targets * nb_channels, -1) * inside


def _chunk_size(nb_bins: int, nb_signals: int, values: int = _CHUNK_VALUES) -> int:
    """Blocks or frames per chunk: arrays of about ``values`` complex values."""
    return max(1, values // (nb_bins * nb_signals))


def _bins_first(spec: torch.Tensor) -> torch.Tensor:
    """``(batch, sources, bins)`` spectra as a contiguous ``(bins, batch, sources)`` tensor."""
    nb_batch, nb_sources, nb_bins = spec.shape
    return spec.reshape(nb_batch * nb_sources, nb_bins).T.contiguous().reshape(nb_bins, nb_batch, nb_sources)


def _fast_fft_size(n: int) -> int:
    """Smallest 5-smooth integer >= n (a length pocketfft, MKL and cuFFT transform fast)."""
    best = 1 << max(0, (n - 1).bit_length())
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            size = power35
            while size < n:
                size *= 2
            best = min(best, size)
            power35 *= 3
        power5 *= 5
    return best
