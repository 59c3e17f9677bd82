"""Running a separation model over a whole track: open-unmix's Separator, streamed.

What open-unmix's ``Separator.forward`` computes, and what this module computes for spectrogram
models (bit for bit up to float32 reduction order; tested against it):

1. the centred STFT of the mixture (``center=True``, reflect padding, periodic Hann window);
2. each target model applied to the mixture magnitude (a mono model to the channel mean);
3. multichannel Wiener filtering with EM (:mod:`umxtools.filtering`), independently on
   consecutive windows of ``wiener_win_len`` frames;
4. the inverse STFT, cut to the input length; 5. optional sums of targets (``aggregate``).

open-unmix holds every stage for the whole track at once (with umxhq-sized models about 2 GB for
a minute of audio, 16 GB for ten). Here only the BLSTM sees the whole track, because a
bidirectional LSTM needs it; everything else goes window by window (docs/separate.md):

- pass 1, per chunk of frames: STFT -> magnitude -> the model's ``encode`` (``fc1``, ``bn1``,
  ``tanh``), kept as ``(frames, hidden)`` per target; then each target's ``context`` (the LSTM)
  over the whole sequence, also ``(frames, hidden)``: a few hundred bytes per frame and target
  instead of the ``2 x channels x bins`` floats of a spectrogram;
- pass 2, per Wiener window: STFT of that window again, the model's ``decode`` (``fc2`` ...
  ``relu * mix``) on it, Wiener EM, inverse FFT and overlap-add (:mod:`umxtools.transforms`'
  :class:`CentredSTFT` and :class:`OverlapAdd`), then the finished samples are handed on (to be
  written to disk by :mod:`umxtools.stems`) and dropped.

Models that are not per-target UMX models are run whole (or, with ``segment``, in overlapping
cross-faded segments), and their output is then streamed the same way. Time-domain models get no
Wiener filter: their waveforms are the estimates and ``residual`` is the mixture minus their sum.

Shapes: audio ``(channels, samples)``; STFTs ``(channels, bins, frames)`` complex (torch.stft's),
``(channels, frames, bins)`` for the Wiener filter; target
magnitudes ``(targets, channels, frames, bins)``; UMX internals ``(frames, batch=1, channels,
bins)`` as open-unmix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from umxtools import fileio, segments
from umxtools.errors import UsageError
from umxtools.filtering import wiener
from umxtools.models import ModelError
from umxtools.models.loading import SeparationModel
from umxtools.models.umx import OpenUnmix
from umxtools.transforms import CentredSTFT, OverlapAdd

if TYPE_CHECKING:
    from umxtools.progress import Progress

# frames per chunk of pass 1 (encoder input: chunk x channels x bins floats, 32 MB at 2048)
ENCODE_CHUNK = 2048
# frames per window when the windows do not change the result (no EM: each bin is filtered alone)
FREE_WINDOW = 300
# samples per block handed out by time-domain models run whole
WAVE_BLOCK = 1 << 18


@dataclass(frozen=True)
class SeparationSettings:
    """How to separate; open-unmix's Separator defaults (as its ``umx*`` loaders set them).

    Attributes:
        niter: EM iterations of the Wiener filter (0: the initial estimates).
        softmask: initial estimates as ratio masks instead of magnitudes with the mixture phase.
        residual: one more output, the mixture minus the targets (before EM), named by
            :func:`residual_name`: ``accompaniment`` after a vocals-only separation, else ``residual``.
        wiener_win_len: frames filtered together; ``None`` filters the whole track at once (as
            open-unmix; memory then grows with the track).
        aggregate: output name -> the outputs it sums, replacing the per-target outputs (as
            open-unmix's ``aggregate_dict``).
        segment, overlap: for models that accept excerpts: run the model on segments of
            ``segment`` seconds overlapping by ``overlap`` of a segment, cross-faded linearly.
            Segment-based models (HTDemucs, MSST checkpoints) follow their own rules instead
            (:mod:`umxtools.segments`): ``segment`` replaces their segment or ``chunk_size``,
            ``overlap`` is demucs's.
        shifts, seed: demucs's random time shifts, averaged; the offsets come from ``seed``.
        batch_size: segments run together (default 1; an MSST config's ``batch_size``).
        num_overlap: MSST's windows per chunk (default: the MSST config's, else 4).
        device: torch device name, or ``auto``.
    """

    niter: int = 1
    softmask: bool = False
    residual: bool = False
    wiener_win_len: int | None = 300
    aggregate: dict[str, list[str]] | None = None
    segment: float | None = None
    overlap: float = 0.25
    device: str = "cpu"
    shifts: int = 0
    batch_size: int | None = None
    num_overlap: int | None = None
    seed: int = 0

    def as_dict(self) -> dict:
        return {"niter": self.niter, "softmask": self.softmask, "residual": self.residual, "wiener_win_len": self.wiener_win_len,
                "aggregate": self.aggregate, "segment": self.segment, "overlap": self.overlap, "device": self.device,
                "shifts": self.shifts, "batch_size": self.batch_size, "num_overlap": self.num_overlap, "seed": self.seed}


def parse_aggregate(items: list[str] | tuple[str, ...]) -> dict[str, list[str]] | None:
    """``["accompaniment=drums+bass+other", ...]`` -> ``{"accompaniment": ["drums", "bass", "other"]}``.

    ``NAME`` names a file (``NAME.wav``): a plain file name, checked by :func:`umxtools.fileio.check_name`.
    """
    if not items:
        return None
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, parts = item.partition("=")
        names = [p.strip() for p in parts.split("+")]
        if not sep or not name.strip() or not all(names):
            raise UsageError(None, f"aggregate {item!r} is not NAME=TARGET+TARGET...")
        if name.strip() in out:
            raise UsageError(None, f"aggregate {name.strip()!r} is defined twice")
        fileio.check_name(name.strip(), "aggregate name", "--aggregate")
        out[name.strip()] = names
    return out


def residual_name(targets: list[str]) -> str:
    """The name of the residual output: ``accompaniment`` when the only target is ``vocals``
    (mixture minus vocals is MUSDB18's accompaniment, the name ``umxtools eval`` and museval
    score), ``residual`` otherwise (it is then no source of any dataset)."""
    return "accompaniment" if list(targets) == ["vocals"] else "residual"


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:1``, ``mps`` or ``auto`` (CUDA when available) -> a usable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(None, f"{name!r} is not a torch device (cpu, cuda, cuda:N, mps, auto)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(None, f"device {name!r}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(None, f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(None, f"device {name!r}: MPS is not available on this machine")
    return device


class Separator:
    """A loaded model and settings, ready to separate any number of tracks.

    Use :meth:`stream` for bounded memory (blocks of finished samples, in order) or
    :meth:`separate` for whole arrays. Audio is at :attr:`sample_rate`, stereo.
    """

    def __init__(self, model: SeparationModel, settings: SeparationSettings | None = None):
        s = settings or SeparationSettings()
        self.model, self.settings = model, s
        self.device = resolve_device(s.device)
        model.to(self.device)
        self.residual = residual_name(model.targets) if s.residual else None
        if self.residual in model.targets:
            raise UsageError(None, f"the residual would be named {self.residual!r}, which is already one of the targets "
                                   f"({', '.join(model.targets)})")
        self.sources = [*model.targets, *([self.residual] if self.residual else [])]
        if s.niter < 0:
            raise UsageError(None, f"niter must be 0 or more, got {s.niter}")
        if model.kind == "spectrogram" and s.niter > 0 and len(self.sources) == 1:
            # open-unmix refuses it too (its error names --residual): EM with one source gives back the mixture
            rest = residual_name(model.targets)
            raise UsageError(None, f"Wiener EM (--niter {s.niter}) needs two or more outputs and this separation has only "
                                   f"{self.sources[0]!r}: add --residual (the mixture minus it, written as {rest!r}) "
                                   "or pass --niter 0")
        if s.wiener_win_len is not None and s.wiener_win_len < 1:
            raise UsageError(None, f"wiener_win_len must be at least 1 frame, got {s.wiener_win_len}")
        if s.segment is not None:
            if not model.chunkable:
                raise UsageError(None, "segments change what a bidirectional UMX model hears; UMX models are "
                                       "separated whole, with memory bounded anyway")
            if s.segment <= 0:
                raise UsageError(None, f"segment must be positive, got {s.segment}")
        if not 0 <= s.overlap <= 0.5:
            raise UsageError(None, f"overlap must be within [0, 0.5] of a segment, got {s.overlap}")
        if s.aggregate:
            for name, parts in s.aggregate.items():
                unknown = [p for p in parts if p not in self.sources]
                if unknown:
                    raise UsageError(None, f"aggregate {name!r}: {unknown[0]!r} is not among the outputs ({', '.join(self.sources)})")
        self.outputs = list(s.aggregate) if s.aggregate else list(self.sources)
        if model.module is not None:
            index = {t: i for i, t in enumerate(model.module_targets)}
            self._select = [index[t] for t in model.targets]
        self._plan = segments.plan_for(model, s, self._batch_call) if model.kind == "waveform" else None
        if self._plan is None and (s.shifts or s.batch_size is not None or s.num_overlap is not None):
            raise UsageError(None, "shifts, batch size and num_overlap apply to segment-based models (HTDemucs, MSST checkpoints)")

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    @property
    def min_samples(self) -> int:
        """The shortest input: one STFT frame for spectrogram models."""
        return self.model.n_fft if self.model.kind == "spectrogram" else 1

    def separate(self, audio: np.ndarray | torch.Tensor, progress: Progress | None = None) -> dict[str, np.ndarray]:
        """``(channels, samples)`` mixture -> ``{output: (channels, samples)}`` float32 arrays."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        for block in self.stream(audio, progress):
            for name, x in block.items():
                parts[name].append(x)
        return {name: np.concatenate(p, axis=-1) for name, p in parts.items()}

    def stream(self, audio: np.ndarray | torch.Tensor, progress: Progress | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive blocks ``{output: (channels, n)}`` (float32, CPU) covering the whole input.

        ``progress(event, info)`` (:mod:`umxtools.progress`) gets ``total`` and ``advance``
        ``{"n": ...}`` in segments or windows. Raises ``ValueError`` for input shorter than :attr:`min_samples` or not stereo.
        """
        audio = torch.as_tensor(audio, dtype=torch.float32)
        if audio.dim() != 2 or audio.shape[0] != 2:
            raise ValueError(f"expected stereo audio of shape (2, samples), got {tuple(audio.shape)}")
        if audio.shape[1] < self.min_samples:
            raise ValueError(f"{audio.shape[1]} samples is shorter than one STFT frame ({self.min_samples})")
        progress = progress or (lambda event, info: None)
        audio = audio.to(self.device)
        with torch.inference_mode():
            blocks = self._spectrogram_blocks(audio, progress) if self.model.kind == "spectrogram" else self._waveform_blocks(audio, progress)
            for block in blocks:  # (sources, channels, n)
                if block.shape[-1]:
                    yield self._outputs(block.float().cpu())

    def _outputs(self, block: torch.Tensor) -> dict[str, np.ndarray]:
        est = dict(zip(self.sources, block))
        if self.settings.aggregate:
            # open-unmix's to_dict: 0.0 + first + second + ...
            est = {name: sum((est[p] for p in parts), torch.tensor(0.0)) for name, parts in self.settings.aggregate.items()}
        return {name: x.numpy() for name, x in est.items()}

    # --- spectrogram models ---------------------------------------------------------------------

    def _spectrogram_blocks(self, audio: torch.Tensor, progress: Progress) -> Iterator[torch.Tensor]:
        m, s = self.model, self.settings
        stft = CentredSTFT(audio, m.n_fft, m.n_hop)
        nb_frames = stft.nb_frames
        win = s.wiener_win_len or nb_frames
        if s.niter == 0:
            win = min(win, FREE_WINDOW)
        windows = [(a, min(nb_frames, a + win)) for a in range(0, nb_frames, win)]
        mono = m.nb_channels == 1
        if m.umx is not None:
            estimator = _UMXEstimator(m.umx, stft, mono, progress, len(windows))
        else:
            estimator = _ModuleEstimator(m.module, self._select, stft, mono, self._segment_len(m.n_hop), progress, len(windows))
        ola = OverlapAdd(m.n_fft, m.n_hop, audio.shape[-1], device=audio.device)
        for a, b in windows:
            spec = stft.frames(a, b)  # (channels, bins, frames)
            mags = estimator.magnitudes(a, b, spec)  # (targets, channels or 1, frames, bins)
            mix = spec.transpose(1, 2).contiguous()  # (channels, frames, bins)
            y = wiener(mags, mix, s.niter, softmask=s.softmask, residual=s.residual)  # (sources, channels, frames, bins)
            del mags
            yield ola.push(y)
            progress("advance", {"n": 1})
        yield ola.finish()

    def _segment_len(self, unit: int) -> tuple[int, int] | None:
        """``(segment, overlap)`` in units of ``unit`` samples (frames or samples), or None."""
        s = self.settings
        if s.segment is None:
            return None
        seg = max(1, round(s.segment * self.sample_rate / unit))
        return seg, min(seg // 2, round(s.overlap * seg))

    # --- waveform models --------------------------------------------------------------------------

    def _waveform_blocks(self, audio: torch.Tensor, progress: Progress) -> Iterator[torch.Tensor]:
        length = audio.shape[-1]
        seg = self._segment_len(1)
        mono = self.model.nb_channels == 1

        def run(a: int, b: int) -> torch.Tensor:
            x = audio[:, a:b]
            x = x.mean(0, keepdim=True) if mono else x
            y = self.model.module(x[None])
            if y.dim() != 4 or y.shape[0] != 1 or y.shape[1] != len(self.model.module_targets) or y.shape[-1] != b - a:
                raise ModelError(self.model.identity.get("class"), f"returned shape {tuple(y.shape)} for input {tuple(x[None].shape)}; "
                                 f"a waveform model returns (batch, targets={len(self.model.module_targets)}, channels, samples)")
            return y[0, self._select].expand(-1, audio.shape[0], -1)  # (targets, channels, samples)

        if self._plan is not None:
            progress("total", {"n": self._plan.nb_segments(length)})
            chunks = _starts(y[self._select] for y in self._plan.blocks(audio, progress))
        elif seg is None:
            progress("total", {"n": 1})
            whole = run(0, length)  # its own name: the loop below rebinds y while this generator still reads it
            progress("advance", {"n": 1})
            chunks = ((whole[..., a:a + WAVE_BLOCK], a) for a in range(0, length, WAVE_BLOCK))
        else:
            progress("total", {"n": _nb_segments(length, *seg)})
            chunks = _crossfaded(run, length, *seg, progress)
        for y, a in chunks:
            if self.settings.residual:
                y = torch.cat([y, (audio[:, a:a + y.shape[-1]] - _sum_first(y))[None]])
            yield y


    def _batch_call(self, model: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``model`` on a batch of segments ``(batch, channels, n)``, its output shape checked and a
        mono model's output given the input's channels: ``(batch, sources, channels, n)``."""
        mono = self.model.nb_channels == 1

        def call(x: torch.Tensor) -> torch.Tensor:
            y = model(x.mean(1, keepdim=True) if mono else x)
            if y.dim() != 4 or y.shape[0] != x.shape[0] or y.shape[1] != len(self.model.module_targets) or y.shape[-1] != x.shape[-1]:
                raise ModelError(self.model.identity.get("class"), f"returned shape {tuple(y.shape)} for input {tuple(x.shape)}; "
                                 f"a waveform model returns (batch, targets={len(self.model.module_targets)}, channels, samples)")
            return y.expand(-1, -1, x.shape[1], -1)

        return call


def _starts(blocks: Iterator[torch.Tensor]) -> Iterator[tuple[torch.Tensor, int]]:
    """Consecutive blocks with their first sample's position."""
    start = 0
    for y in blocks:
        yield y, start
        start += y.shape[-1]


def _sum_first(t: torch.Tensor) -> torch.Tensor:
    total = t[0]
    for j in range(1, t.shape[0]):
        total = total + t[j]
    return total


# --- target magnitudes, window by window ----------------------------------------------------------


def _magnitude(spec: torch.Tensor, mono: bool) -> torch.Tensor:
    """``(channels, bins, frames)`` complex -> the model input ``(batch=1, channels or 1, bins, frames)``.

    Contiguous in that order, as open-unmix's ``ComplexNorm`` output: ``OpenUnmix.forward``
    permutes it and the strides of that view decide which matrix-product kernel ``fc1`` gets (a
    mono model's input is used strided), so the same layout gives the same rounding.
    """
    mag = spec.abs()
    if mono:  # open-unmix's ComplexNorm(mono=True): the channel mean of the magnitudes
        mag = mag.mean(0, keepdim=True)
    return mag[None]


def _frames_first(mag: torch.Tensor) -> torch.Tensor:
    """``(1, channels, bins, frames)`` -> UMX's internal ``(frames, 1, channels, bins)`` view."""
    return mag.permute(3, 0, 1, 2)


class _UMXEstimator:
    """Per-target :class:`OpenUnmix` models, the BLSTM over the whole track, the rest per window:
    the model's own ``encode`` per chunk, ``context`` once, ``decode`` per window.

    Holds the ``(frames, hidden)`` encoder and LSTM outputs of every target: ``8 * hidden`` bytes
    per frame and target (106 MB per target for 10 minutes at 44.1 kHz and hidden 512), against
    ``8 * channels * bins`` (860 MB) for the spectrogram estimate open-unmix keeps.
    """

    def __init__(self, models: dict[str, OpenUnmix], stft: CentredSTFT, mono: bool, progress: Progress, nb_windows: int):
        self.models, self.mono = models, mono
        n = stft.nb_frames
        chunks = [(a, min(n, a + ENCODE_CHUNK)) for a in range(0, n, ENCODE_CHUNK)]
        progress("total", {"n": len(chunks) + len(models) + nb_windows})
        device = stft.audio.device
        self.h = {t: torch.empty(n, 1, m.hidden_size, device=device) for t, m in models.items()}
        for a, b in chunks:
            mag = _frames_first(_magnitude(stft.frames(a, b), mono))
            for t, m in models.items():
                self.h[t][a:b] = m.encode(mag)  # (frames, 1, hidden)
            progress("advance", {"n": 1})
        self.lstm = {}
        for t, m in models.items():
            self.lstm[t] = m.context(self.h[t])  # (frames, 1, hidden): the only whole-track step
            progress("advance", {"n": 1})

    def magnitudes(self, a: int, b: int, spec: torch.Tensor) -> torch.Tensor:
        """Frames ``a:b`` of every target: ``(targets, channels, frames, bins)``."""
        mag = _frames_first(_magnitude(spec, self.mono))  # (frames, 1, channels, bins)
        # decode: (frames, 1, channels, bins) -> (channels, frames, bins)
        return torch.stack([m.decode(self.h[t][a:b], self.lstm[t][a:b], mag)[:, 0].permute(1, 0, 2)
                            for t, m in self.models.items()])


class _ModuleEstimator:
    """Any spectrogram model: run on the whole magnitude, or on cross-faded segments of frames."""

    def __init__(self, module, select: list[int], stft: CentredSTFT, mono: bool, segment: tuple[int, int] | None,
                 progress: Progress, nb_windows: int):
        self.module, self.select, self.stft, self.mono = module, select, stft, mono
        n = stft.nb_frames
        if segment is None:
            progress("total", {"n": 1 + nb_windows})
            mag = torch.cat([_magnitude(stft.frames(a, min(n, a + ENCODE_CHUNK)), mono) for a in range(0, n, ENCODE_CHUNK)], dim=-1)
            self.out = self._run(mag)  # (targets, channels, bins, frames)
            progress("advance", {"n": 1})
            self.pieces = None
        else:
            progress("total", {"n": _nb_segments(n, *segment) + nb_windows})
            self.out = None
            self.pieces = _crossfaded(self._run_frames, n, *segment, progress)
            self.buffer, self.buffer_start = None, 0

    def _run(self, mag: torch.Tensor) -> torch.Tensor:
        """``(1, channels, bins, frames)`` -> selected targets ``(targets, channels, bins, frames)``."""
        y = self.module(mag)
        if y.dim() == 4:  # a single-target model may leave out the targets axis
            y = y[:, None]
        if y.dim() != 5 or y.shape[0] != 1 or y.shape[2:] != (y.shape[2], mag.shape[2], mag.shape[3]):
            raise ModelError(type(self.module).__name__, f"returned shape {tuple(y.shape)} for input {tuple(mag.shape)}; a spectrogram "
                             "model returns (batch, targets, channels, bins, frames)")
        return y[0, self.select]

    def _run_frames(self, a: int, b: int) -> torch.Tensor:
        return self._run(_magnitude(self.stft.frames(a, b), self.mono))

    def magnitudes(self, a: int, b: int, spec: torch.Tensor) -> torch.Tensor:
        if self.out is not None:
            return self.out[..., a:b].transpose(2, 3)
        while self.buffer is None or self.buffer_start + self.buffer.shape[-1] < b:
            piece, _ = next(self.pieces)
            self.buffer = piece if self.buffer is None else torch.cat([self.buffer, piece], dim=-1)
        out = self.buffer[..., a - self.buffer_start:b - self.buffer_start].transpose(2, 3)
        self.buffer, self.buffer_start = self.buffer[..., b - self.buffer_start:], b
        return out


# --- segments ------------------------------------------------------------------------------------------


def _nb_segments(length: int, seg: int, overlap: int) -> int:
    step = seg - overlap
    return 1 if length <= seg else 1 + -(-(length - seg) // step)


def _crossfaded(run: Callable[[int, int], torch.Tensor], length: int, seg: int, overlap: int,
                progress: Progress) -> Iterator[tuple[torch.Tensor, int]]:
    """``run(a, b)`` on segments of ``seg`` overlapping by ``overlap`` along the last axis, cross-faded.

    In each overlap the earlier segment fades out and the later fades in linearly, with weights
    summing to one, so a model that treats every position alone gives back what it gives on the
    whole input. Yields ``(block, start)``: consecutive finished blocks covering ``[0, length)``.
    """
    step = seg - overlap
    held: torch.Tensor | None = None  # the previous segment's last `overlap` positions
    a = 0
    while True:
        b = min(length, a + seg)
        y = run(a, b)
        progress("advance", {"n": 1})
        if held is not None and overlap:
            fade = (torch.arange(overlap, device=y.device, dtype=y.dtype) + 0.5) / overlap
            y = y.clone()
            y[..., :overlap] = held * (1 - fade) + y[..., :overlap] * fade
        if b == length:
            yield y, a
            return
        yield y[..., :step], a
        held = y[..., step:]
        a += step

