"""Multichannel Wiener filtering with expectation-maximisation, as open-unmix's Separator does it.

open-unmix (``openunmix.filtering.wiener`` and ``expectation_maximization``, after norbert) turns
the target magnitudes a model estimates into complex STFTs of the targets: an initial estimate
(the magnitudes with the mixture's phase, or a soft mask of the mixture), an optional residual
target (mixture minus the others), then ``iterations`` EM steps that re-estimate per-target power
spectral densities ``v`` and per-bin spatial covariance matrices ``R`` and apply the multichannel
Wiener filter ``v_j R_j Cxx^-1`` to the mixture. References: Nugraha, Liutkus & Vincent,
"Multichannel audio source separation with deep neural networks", IEEE/ACM TASLP 2016; Uhlich et
al., ICASSP 2017.

Why this module is not a thin wrapper: open-unmix spends most of a separation in this step (about
half of the time with umxhq-sized models) because it works on ``(..., 2)`` real/imaginary tensors
through fancy indexing and a Python loop over matrix entries. Here every 2x2 matrix entry is a
pair of contiguous real ``(frames, bins)`` tensors and the real-valued entries (the diagonals of
``R`` and ``Cxx``, the determinant) stay real. The arithmetic is open-unmix's, operation for
operation and in the same order (products, sums, the adjugate inverse scaled by
``det / det**2``, frame sums in chunks of 200 over tensors of open-unmix's layout), so results
equal open-unmix's bit for bit on CPU (tests/test_filtering.py: open-unmix's own test grid, mono
and stereo, one to three sources, float32 and float64), not merely to a tolerance. The one
exception is deliberate: bins where open-unmix's float32 determinant is zero and its output NaN
are filtered again in float64 (``_refilter_float64``).

Shapes (this module's layout; ``sources`` first so that each source is a contiguous block):

- target magnitudes ``(sources, channels or 1, frames, bins)`` (a mono model's single channel is
  broadcast over the mixture's channels, as in open-unmix);
- mixture STFT ``(channels, frames, bins)`` complex;
- estimates ``(sources [+1 residual], channels, frames, bins)`` complex.
"""

from __future__ import annotations

import torch

# open-unmix's defaults (filtering.wiener and expectation_maximization)
EPS = 1e-10
SCALE_FACTOR = 10.0
EM_BATCH = 200  # frames per partial sum of the covariance statistics, as open-unmix chunks them


def wiener(
    magnitudes: torch.Tensor,
    mix: torch.Tensor,
    iterations: int = 1,
    softmask: bool = False,
    residual: bool = False,
    scale_factor: float = SCALE_FACTOR,
    eps: float = EPS,
) -> torch.Tensor:
    """Complex target STFTs from target magnitudes and the mixture STFT.

    Args:
        magnitudes: ``(sources, channels or 1, frames, bins)`` non-negative target estimates.
        mix: ``(channels, frames, bins)`` complex mixture STFT, ``channels`` 1 or 2.
        iterations: EM steps; 0 returns the initial estimates. As in open-unmix, EM runs on mono
            mixtures and on a single source without the residual too (then ``R`` is that
            source's own covariance and the filter is close to the identity).
        softmask: initial estimates as ratio masks of the mixture instead of the magnitudes
            with the mixture's phase.
        residual: append the mixture minus the other initial estimates as one more source.

    Returns:
        ``(sources + residual, channels, frames, bins)`` complex, the dtype of ``mix``.
    """
    nb_channels, nb_frames, nb_bins = mix.shape
    assert magnitudes.dim() == 4 and magnitudes.shape[2:] == (nb_frames, nb_bins), (magnitudes.shape, mix.shape)
    # every step works on contiguous (frames, bins) planes: torch's sums over frames take their
    # order of additions from the memory layout, and open-unmix's layout is fixed
    magnitudes = magnitudes.contiguous()
    x_re, x_im = mix.real.contiguous(), mix.imag.contiguous()
    if softmask:
        y_re, y_im = _softmask_estimates(magnitudes, x_re, x_im, eps)
    else:
        # open-unmix's atan2 writes 1.0 into the real part of every exactly-zero mixture bin (an
        # in-place side effect on the mixture it then filters); kept so that outputs match it
        x_re = x_re + ((x_re == 0) & (x_im == 0)).to(x_re.dtype)
        angle = _atan2(x_im, x_re)
        cos, sin = torch.cos(angle), torch.sin(angle)  # (channels, frames, bins)
        y_re, y_im = magnitudes * cos, magnitudes * sin  # (sources, channels, frames, bins)
    if residual:
        y_re = torch.cat([y_re, (x_re - _sum_sources(y_re))[None]])
        y_im = torch.cat([y_im, (x_im - _sum_sources(y_im))[None]])
    if iterations == 0:
        return torch.complex(y_re, y_im)
    if nb_channels not in (1, 2):
        raise ValueError(f"EM is implemented for mono and stereo mixtures, got {nb_channels} channels")
    # scale down for numerical stability, by open-unmix's rule: the largest mixture magnitude
    # becomes at most scale_factor
    one = torch.ones((), dtype=x_re.dtype, device=x_re.device)
    max_abs = torch.maximum(one, torch.sqrt(x_re * x_re + x_im * x_im).max() / scale_factor)
    # in place where the tensor is ours (same values as open-unmix's out-of-place division)
    x_re, x_im = x_re / max_abs, x_im / max_abs
    y_re, y_im = y_re.div_(max_abs), y_im.div_(max_abs)
    y = expectation_maximization(y_re, y_im, x_re, x_im, iterations, eps)
    return y.mul_(max_abs)


def _atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """open-unmix's ``atan2`` (arctangent of ``y / x`` with quadrant fixes), value for value.

    ``torch.atan2`` differs from it by a rounding step; using the same formula keeps the initial
    phase, and so every later step, identical. ``x`` has no ``(0, 0)`` pairs (the caller's fix).
    """
    pi = 2 * torch.asin(torch.tensor(1.0, dtype=x.dtype, device=x.device))
    out = torch.atan(y / x)
    out = torch.where((y >= 0) & (x < 0), out + pi, out)
    out = torch.where((y < 0) & (x < 0), out - pi, out)
    out = torch.where((y > 0) & (x == 0), pi / 2, out)
    return torch.where((y < 0) & (x == 0), -pi / 2, out)


def _sum_sources(t: torch.Tensor) -> torch.Tensor:
    """Sum over the sources axis one after the other, as torch sums open-unmix's short last axis."""
    total = t[0]
    for j in range(1, t.shape[0]):
        total = total + t[j]
    return total


def _softmask_estimates(magnitudes, x_re, x_im, eps):
    ratio = magnitudes / (eps + _sum_sources(magnitudes))  # (sources, channels or 1, frames, bins)
    return x_re * ratio, x_im * ratio


def expectation_maximization(
    y_re: torch.Tensor,
    y_im: torch.Tensor,
    x_re: torch.Tensor,
    x_im: torch.Tensor,
    iterations: int,
    eps: float = EPS,
    block: int = 32,
) -> torch.Tensor:
    """Refine source estimates with ``iterations`` EM steps (open-unmix's simplified EM).

    Args:
        y_re, y_im: ``(sources, channels, frames, bins)`` initial estimates, real and imaginary
            parts; ``channels`` 1 or 2.
        x_re, x_im: ``(channels, frames, bins)`` mixture, real and imaginary parts.
        block: frames filtered at a time; only memory traffic depends on it (the filter of a
            frame uses that frame and the whole-window statistics), so it is chosen to keep the
            temporaries of one block in cache.

    Returns:
        the refined estimates, ``(sources, channels, frames, bins)`` complex.
    """
    nb_sources, nb_channels, nb_frames, nb_bins = y_re.shape
    assert nb_channels in (1, 2)
    dtype, device = x_re.dtype, x_re.device
    # open-unmix makes sqrt(eps) and the initial weight eps as default-dtype (float32) scalars,
    # which float64 arithmetic then promotes: the same rounded constants here
    eps32 = torch.tensor(eps, dtype=torch.float32)
    reg = torch.sqrt(eps32).to(dtype=dtype, device=device)  # open-unmix: sqrt(eps) * identity
    eps_t = eps32.to(dtype=dtype, device=device)
    filter_block = _filter_block if nb_channels == 2 else _filter_block_mono
    complex_dtype = torch.complex(x_re[:1, :1, :1], x_im[:1, :1, :1]).dtype
    for it in range(iterations):
        # power spectral densities: channel mean of |y|^2, (sources, frames, bins)
        v = y_re[:, 0] * y_re[:, 0] + y_im[:, 0] * y_im[:, 0]
        if nb_channels == 2:
            v = (v + (y_re[:, 1] * y_re[:, 1] + y_im[:, 1] * y_im[:, 1])) / 2
        # spatial covariance matrices, (bins,) per entry: R00, R11 real, R01 complex, R10 = conj(R01)
        # (mono: R00 alone)
        R = [_spatial_covariance(y_re[j], y_im[j], v[j], eps_t) for j in range(nb_sources)]
        if it == iterations - 1:
            # the last step writes straight into the complex result (no re/im -> complex copy)
            y = torch.empty(y_re.shape, dtype=complex_dtype, device=device)
            new_re, new_im = torch.view_as_real(y).unbind(-1)
        else:
            new_re, new_im = torch.empty_like(y_re), torch.empty_like(y_im)
        for t0 in range(0, nb_frames, block):
            t = slice(t0, min(nb_frames, t0 + block))
            filter_block(R, v[:, t], x_re[:, t], x_im[:, t], reg, new_re[:, :, t], new_im[:, :, t])
        y_re, y_im = new_re, new_im
    return y


def _spatial_covariance(y_re, y_im, v, eps_t):
    """``sum_t y y^H / (eps + sum_t v)`` for one source: ``(r00, r11, r01_re, r01_im)`` (stereo)
    or ``(r00,)`` (mono), each ``(bins,)``.

    ``y_re, y_im``: ``(channels, frames, bins)``; ``v``: ``(frames, bins)``. Frame sums run in
    chunks of ``EM_BATCH`` frames added in order, as open-unmix accumulates them, and each chunk
    is summed as open-unmix's ``(frames, bins, channels, channels, 2)`` covariance tensor, in that
    layout: torch's sum over frames takes a different order of additions for the last columns of
    a row than for the others, so only the same layout gives the same sums for every bin count
    (a ``(4, frames, bins)`` stack did for 2049 or 65 bins, not for 10 or 127). The entries
    open-unmix computes and never reads (R10, the imaginary parts of the diagonal) stay zero.
    """
    nb_channels = y_re.shape[0]
    nb_frames, nb_bins = v.shape
    acc = None
    weight = eps_t
    for t0 in range(0, nb_frames, EM_BATCH):
        t = slice(t0, min(nb_frames, t0 + EM_BATCH))
        a_re, a_im = y_re[0, t], y_im[0, t]
        part = y_re.new_zeros((t.stop - t0, nb_bins, nb_channels, nb_channels, 2))
        part[:, :, 0, 0, 0] = a_re * a_re + a_im * a_im  # y0 conj(y0)
        if nb_channels == 2:
            b_re, b_im = y_re[1, t], y_im[1, t]
            part[:, :, 1, 1, 0] = b_re * b_re + b_im * b_im  # y1 conj(y1)
            part[:, :, 0, 1, 0] = a_re * b_re + a_im * b_im  # real part of y0 conj(y1)
            part[:, :, 0, 1, 1] = a_im * b_re - a_re * b_im  # imaginary part of y0 conj(y1)
        part = part.sum(dim=0)  # (bins, channels, channels, 2)
        acc = part if acc is None else acc + part
        weight = weight + v[t].sum(dim=0)
    acc = acc / weight[:, None, None, None]
    if nb_channels == 1:
        return (acc[:, 0, 0, 0],)
    return acc[:, 0, 0, 0], acc[:, 1, 1, 0], acc[:, 0, 1, 0], acc[:, 0, 1, 1]


def _filter_block_mono(R, v, x_re, x_im, reg, out_re, out_im) -> None:
    """:func:`_filter_block` for one channel: ``y_j = v_j r_j / (sqrt(eps) + sum_k v_k r_k) x``.

    open-unmix's 1x1 "matrices" carry zero imaginary parts, so its complex products reduce to
    these real ones, in its order: the inverse ``c / |c|^2``, then ``r_j * inverse``, times
    ``v_j``, times the mixture. ``c >= sqrt(eps)``, so no bin is singular.
    """
    c = reg
    for j, (r,) in enumerate(R):
        c = c + v[j] * r
    inverse = c / (c * c)
    for j, (r,) in enumerate(R):
        gain = (r * inverse) * v[j]
        out_re[j, 0] = gain * x_re[0]
        out_im[j, 0] = gain * x_im[0]


def _filter_block(R, v, x_re, x_im, reg, out_re, out_im) -> None:
    """Apply each source's Wiener gain ``v_j R_j Cxx^-1`` to the mixture, for one block of frames.

    ``v``: ``(sources, frames, bins)``; ``x_*``: ``(2, frames, bins)``; results are written into
    ``out_*`` ``(sources, 2, frames, bins)``. Matrix entries are named ``rAB``/``cAB``/``iAB``.
    """
    # mixture covariance Cxx = sqrt(eps) I + sum_j v_j R_j (diagonal real, c10 = conj(c01))
    c00, c11, c01_re, c01_im = reg, reg, 0.0, 0.0
    for j, (r00, r11, r01_re, r01_im) in enumerate(R):
        vj = v[j]
        c00 = c00 + vj * r00
        c11 = c11 + vj * r11
        c01_re = c01_re + vj * r01_re
        c01_im = c01_im + vj * r01_im
    # inverse through the adjugate; open-unmix inverts the (real) determinant as det / |det|^2
    det = c00 * c11 - (c01_re * c01_re + c01_im * c01_im)
    d = det / (det * det)
    i00, i11 = d * c11, d * c00
    i01_re, i01_im = -d * c01_re, -d * c01_im  # i10 = conj(i01)
    x0_re, x0_im, x1_re, x1_im = x_re[0], x_im[0], x_re[1], x_im[1]
    for j, (r00, r11, r01_re, r01_im) in enumerate(R):
        # gain = R_j @ inv(Cxx), entry by entry, each a sum over the inner index in order; the
        # products shared by two entries are formed once (same operands, same rounding)
        a = r01_re * i01_re + r01_im * i01_im
        b = r01_re * i01_im - r01_im * i01_re
        g00_re, g00_im = r00 * i00 + a, -b
        g01_re, g01_im = r00 * i01_re + r01_re * i11, r00 * i01_im + r01_im * i11
        g10_re, g10_im = r01_re * i00 + r11 * i01_re, -(r01_im * i00 + r11 * i01_im)
        g11_re, g11_im = a + r11 * i11, b
        vj = v[j]
        g00_re, g00_im, g01_re, g01_im = g00_re * vj, g00_im * vj, g01_re * vj, g01_im * vj
        g10_re, g10_im, g11_re, g11_im = g10_re * vj, g10_im * vj, g11_re * vj, g11_im * vj
        # y_j = gain @ x
        out_re[j, 0] = (g00_re * x0_re - g00_im * x0_im) + (g01_re * x1_re - g01_im * x1_im)
        out_im[j, 0] = (g00_re * x0_im + g00_im * x0_re) + (g01_re * x1_im + g01_im * x1_re)
        out_re[j, 1] = (g10_re * x0_re - g10_im * x0_im) + (g11_re * x1_re - g11_im * x1_im)
        out_im[j, 1] = (g10_re * x0_im + g10_im * x0_re) + (g11_re * x1_im + g11_im * x1_re)
    # Where Cxx is singular in float32 (every source's channels exactly proportional, as a mono
    # model on mono input gives: sqrt(eps) vanishes from c00 * c11 - |c01|^2), open-unmix's
    # determinant is 0 and its output NaN; those bins alone are filtered again in float64.
    bad = ~torch.isfinite(d)
    if bad.any():
        _refilter_float64(R, v, x_re, x_im, reg, bad, out_re, out_im)


def _refilter_float64(R, v, x_re, x_im, reg, bad, out_re, out_im) -> None:
    """The Wiener filter of the ``bad`` (frame, bin) positions of a block, in float64.

    On the CPU: they are few, and not every accelerator has float64 (MPS has none).
    """
    t, f = bad.nonzero(as_tuple=True)
    f64, cpu = torch.float64, torch.device("cpu")
    vb = v[:, t, f].to(cpu, f64)  # (sources, n)
    Rb = [tuple(e[f].to(cpu, f64) for e in entries) for entries in R]
    c00 = c11 = reg.to(cpu, f64)
    c01 = torch.zeros_like(vb[0], dtype=torch.complex128)
    for j, (r00, r11, r01_re, r01_im) in enumerate(Rb):
        c00, c11 = c00 + vb[j] * r00, c11 + vb[j] * r11
        c01 = c01 + vb[j] * torch.complex(r01_re, r01_im)
    det = c00 * c11 - (c01.real * c01.real + c01.imag * c01.imag)
    inv = [[c11 / det, -c01 / det], [-c01.conj() / det, c00 / det]]
    x = [torch.complex(x_re[c, t, f], x_im[c, t, f]).to(cpu, torch.complex128) for c in range(2)]
    z = [inv[a][0] * x[0] + inv[a][1] * x[1] for a in range(2)]  # inv(Cxx) x
    for j, (r00, r11, r01_re, r01_im) in enumerate(Rb):
        r01 = torch.complex(r01_re, r01_im)
        y = [vb[j] * (r00 * z[0] + r01 * z[1]), vb[j] * (r01.conj() * z[0] + r11 * z[1])]
        for c in range(2):
            out_re[j, c, t, f] = y[c].real.to(out_re.device, out_re.dtype)
            out_im[j, c, t, f] = y[c].imag.to(out_im.device, out_im.dtype)
