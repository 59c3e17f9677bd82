"""Running segment-based waveform models over long audio, streamed: demucs's and MSST's rules.

Models trained on fixed-length excerpts (HTDemucs, the RoFormers) separate a song window by
window, and their published numbers come from their authors' window rules. Each rule is
reproduced here exactly (same windows, same weights, same padding, same order of additions), but
streamed: segments are run in order and every sample that no later segment touches is handed on
and dropped, so memory holds a few segments whatever the song's length, where both references
hold every output of the whole song.

**demucs** (``demucs.apply.apply_model`` of demucs 4.1.0, ``split=True``):

- segments of ``segment_length = int(samplerate * segment)`` samples (``segment``: the model's
  ``segment`` attribute, or a shorter one given) start every ``stride = int((1 - overlap) *
  segment_length)`` samples from 0 while they start inside the signal;
- a segment that runs past the end is read centred: ``(segment_length - n) // 2`` real samples
  before it, zeros after the signal, and the model's output cut back to its ``n`` central samples;
- outputs are weighted by a triangle (``1 .. L//2, L - L//2 .. 1``, divided by its maximum,
  raised to ``transition_power``), summed and divided by the summed weights;
- ``shifts > 0``: the signal is padded with ``max_shift = int(0.5 * samplerate)`` zeros on both
  sides, and for each shift a random ``offset`` in ``[0, max_shift]`` (Python's ``random.randint``)
  starts the segmented signal ``max_shift - offset`` samples before the song; the shifted results
  are averaged. demucs draws the offsets from Python's global ``random``; here they come from
  ``random.Random(seed)`` in demucs's order (bag member by member, shift by shift), so
  ``random.seed(seed); apply_model(...)`` draws the same ones (or pass them: ``shift_offsets``);
- a bag of models (``htdemucs_ft``): each member separately (with its own shifts), its sources
  multiplied by the bag's weights, summed, divided by each source's total weight.

**MSST** (``demix`` of ZFTurbo/Music-Source-Separation-Training, ``utils/model_utils.py`` at
commit 036e68f5, generic mode, i.e. every model but htdemucs):

- ``fade = chunk_size // 10``, ``step = chunk_size // num_overlap``, ``border = chunk_size - step``;
  a signal longer than ``2 * border`` (and ``border > 0``) is reflect-padded by ``border`` on both
  sides, and that padding is cut off at the end;
- chunks start every ``step`` samples from 0 while they start inside the (padded) signal; a chunk
  that runs past the end is padded to ``chunk_size`` by reflection when more than half of it is
  signal, with zeros otherwise;
- chunks are run ``batch_size`` at a time; each output is weighted by a window that fades in and
  out linearly over ``fade`` samples (``linspace(0, 1, fade)``), summed, divided by the summed
  windows, NaNs (0 / 0) set to 0. MSST decides the fades per *batch*: a batch that ends with the
  first chunk has no fade-in, else the last batch has no fade-out, for every chunk in it. That
  quirk is kept: with ``batch_size > 1`` the results differ from ``batch_size = 1`` and equal MSST's.

MSST runs under CUDA autocast when its config has ``training.use_amp`` (the default); the equality
holds in float32 (on the CPU, or with ``use_amp: false``).

Shapes: audio ``(channels, samples)``; a model maps ``(batch, channels, samples)`` to ``(batch,
sources, channels, samples)``; blocks handed on are ``(sources, channels, n)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from umxtools.errors import ModelError, UsageError

if TYPE_CHECKING:
    from umxtools.progress import Progress

Model = Callable[[torch.Tensor], torch.Tensor]
OVERLAP = 0.25  # apply_model's default, and demucs's separate command's


def _no_progress(event: str, info: dict) -> None:
    pass


class _WeightedSum:
    """Streamed ``sum(weight * output) / sum(weight)`` over segments added in order of start.

    ``add(start, y, w)`` adds ``w * y`` at ``[start, start + n)`` (``y``: ``(..., n)``, ``w``: ``(n,)``);
    ``take(upto)`` divides and returns the positions before ``upto`` (absolute), which no later
    segment may touch, and forgets them. The additions happen in the references' order, into
    zeros, so the sums are theirs bit for bit.
    """

    def __init__(self, lead: tuple[int, ...], device, dtype=torch.float32):
        self.lead, self.device, self.dtype = lead, device, dtype
        self.start = 0  # absolute position of the buffers' first sample
        self.acc = torch.zeros(*lead, 0, device=device, dtype=dtype)
        self.wsum = torch.zeros(0, device=device, dtype=dtype)

    def add(self, start: int, y: torch.Tensor, w: torch.Tensor) -> None:
        assert start >= self.start, (start, self.start)
        end = start + y.shape[-1]
        grow = end - self.start - self.acc.shape[-1]
        if grow > 0:
            self.acc = torch.cat([self.acc, self.acc.new_zeros(*self.lead, grow)], dim=-1)
            self.wsum = torch.cat([self.wsum, self.wsum.new_zeros(grow)])
        a, b = start - self.start, end - self.start
        self.acc[..., a:b] += w * y
        self.wsum[a:b] += w

    def take(self, upto: int) -> torch.Tensor:
        n = max(0, min(upto - self.start, self.acc.shape[-1]))
        out = self.acc[..., :n] / self.wsum[:n]
        self.acc, self.wsum = self.acc[..., n:], self.wsum[n:]
        self.start += n
        return out

    @property
    def held(self) -> int:
        """Samples kept (the memory bound the tests check)."""
        return self.acc.shape[-1]


def _read(audio: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """``audio[:, start:start + length]`` with zeros outside the signal: ``(channels, length)``."""
    total = audio.shape[-1]
    a, b = max(0, start), min(total, start + length)
    if a >= b:
        return audio.new_zeros(audio.shape[0], length)
    return F.pad(audio[:, a:b], (a - start, start + length - b))


# --- demucs --------------------------------------------------------------------------------------


@dataclass
class DemucsMember:
    """One model of a demucs bag: the callable, its segment length in samples, the bag's weights
    for its sources (``None`` for a model alone: no weighting at all, as apply_model)."""

    model: Model
    segment_length: int
    weights: Sequence[float] | None = None


@dataclass
class DemucsPlan:
    """``apply_model(model, mix, shifts, split=True, overlap, transition_power)`` as a stream.

    ``max_shift``: ``int(0.5 * samplerate)``. ``shift_offsets``: one list of ``shifts`` offsets per
    member; by default drawn from ``random.Random(seed)`` as demucs draws them.
    """

    members: list[DemucsMember]
    nb_sources: int
    max_shift: int
    overlap: float = 0.25
    transition_power: float = 1.0
    shifts: int = 0
    batch_size: int = 1
    seed: int = 0
    shift_offsets: list[list[int]] | None = None
    held: list[int] = field(default_factory=list, repr=False)  # largest buffer of each view (tests)

    def __post_init__(self):
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be within [0, 1), got {self.overlap}")
        if self.transition_power < 1:
            raise ValueError("transition_power < 1 is refused, as demucs refuses it")
        if self.shifts < 0 or self.batch_size < 1:
            raise ValueError(f"shifts must be >= 0 and batch_size >= 1 (got {self.shifts}, {self.batch_size})")
        for m in self.members:
            if int((1 - self.overlap) * m.segment_length) < 1:
                raise ValueError(f"segments of {m.segment_length} samples overlapping by {self.overlap} do not advance")
        if self.shift_offsets is None and self.shifts:
            rng = random.Random(self.seed)
            self.shift_offsets = [[rng.randint(0, self.max_shift) for _ in range(self.shifts)] for _ in self.members]
        if self.shifts and (len(self.shift_offsets) != len(self.members)
                            or any(len(o) != self.shifts or not all(0 <= s <= self.max_shift for s in o) for o in self.shift_offsets)):
            raise ValueError(f"shift_offsets needs {self.shifts} offsets in [0, {self.max_shift}] per member")

    def _views(self, length: int) -> list[list[tuple[int, int]]]:
        """Per member, the ``(start, length)`` of each segmented view in song positions."""
        if not self.shifts:
            return [[(0, length)] for _ in self.members]
        # the view starts `max_shift - offset` before the song and runs to `max_shift` after it
        return [[(off - self.max_shift, length + self.max_shift - off) for off in offsets] for offsets in self.shift_offsets]

    def nb_segments(self, length: int) -> int:
        return sum(len(range(0, n, int((1 - self.overlap) * m.segment_length)))
                   for m, views in zip(self.members, self._views(length)) for _, n in views)

    def blocks(self, audio: torch.Tensor, progress: Progress = _no_progress) -> Iterator[torch.Tensor]:
        """Consecutive ``(sources, channels, n)`` blocks covering ``audio`` ``(channels, samples)``."""
        length = audio.shape[-1]
        self.held = []
        per_member = []
        for member, views in zip(self.members, self._views(length)):
            streams = [self._view(member, audio, start, n, progress) for start, n in views]
            per_member.append(streams)
        for parts in _aligned([s for streams in per_member for s in streams]):
            i = 0
            estimates = None
            for member, streams in zip(self.members, per_member):
                mine, i = parts[i:i + len(streams)], i + len(streams)
                if self.shifts:
                    out = 0.0
                    for p in mine:
                        out += p
                    out /= self.shifts
                else:
                    out = mine[0]
                if len(self.members) == 1 and member.weights is None:
                    estimates = out
                    continue
                out = out.clone() if out is mine[0] else out
                for k, w in enumerate(member.weights):
                    out[k] *= w
                estimates = out if estimates is None else estimates + out
            if len(self.members) > 1 or self.members[0].weights is not None:
                totals = [0.0] * self.nb_sources
                for member in self.members:
                    for k, w in enumerate(member.weights):
                        totals[k] += w
                for k in range(self.nb_sources):
                    estimates[k] /= totals[k]
            yield estimates

    def _view(self, member: DemucsMember, audio: torch.Tensor, view_start: int, view_len: int,
              progress: Progress) -> Iterator[torch.Tensor]:
        """One segmented pass (apply_model's ``split`` branch) over ``[view_start, view_start + view_len)``
        of the zero-extended song; yields its finished output for song positions ``>= 0`` only."""
        seg = member.segment_length
        stride = int((1 - self.overlap) * seg)
        offsets = list(range(0, view_len, stride))
        # the triangle, largest mid-segment; its integer steps made float as demucs's division does
        weight = torch.cat([torch.arange(1, seg // 2 + 1, device=audio.device),
                            torch.arange(seg - seg // 2, 0, -1, device=audio.device)])
        weight = (weight / weight.max()) ** self.transition_power  # (seg,)
        ola = _WeightedSum((self.nb_sources, audio.shape[0]), audio.device)
        skip = -view_start  # view positions before the song (shifted views only)
        held = 0
        for first in range(0, len(offsets), self.batch_size):
            batch = offsets[first:first + self.batch_size]
            lengths = [min(seg, view_len - o) for o in batch]
            x = torch.stack([_read(audio, view_start + o - (seg - n) // 2, seg) for o, n in zip(batch, lengths)])
            y = member.model(x)  # (batch, sources, channels, seg)
            for j, (o, n) in enumerate(zip(batch, lengths)):
                delta = seg - n
                ola.add(o, y[j, ..., delta // 2:delta // 2 + n], weight[:n])
                held = max(held, ola.held)
                nxt = offsets[first + j + 1] if first + j + 1 < len(offsets) else view_len
                done = ola.take(nxt)  # view positions [ola.start - done, ola.start)
                cut = min(done.shape[-1], max(0, skip - (ola.start - done.shape[-1])))
                if done.shape[-1] > cut:
                    yield done[..., cut:]
                progress("advance", {"n": 1})
        self.held.append(held)


def _aligned(streams: list[Iterator[torch.Tensor]]) -> Iterator[list[torch.Tensor]]:
    """Blocks of several streams over the same positions, re-cut to common spans."""
    pending: list[list[torch.Tensor]] = [[] for _ in streams]
    while True:
        for s, p in zip(streams, pending):
            while not p:
                block = next(s, None)
                if block is None:
                    break
                if block.shape[-1]:
                    p.append(block)
        if any(not p for p in pending):
            assert all(not p for p in pending), "streams of different lengths"
            return
        n = min(p[0].shape[-1] for p in pending)
        out = []
        for p in pending:
            head = p[0]
            out.append(head[..., :n])
            if head.shape[-1] > n:
                p[0] = head[..., n:]
            else:
                p.pop(0)
        yield out


def as_fraction(segment) -> Fraction:
    """Seconds as an exact fraction: ``7.8`` and ``"39/5"`` both give ``Fraction(39, 5)`` (demucs's type)."""
    try:
        value = Fraction(str(segment))
    except (ValueError, ZeroDivisionError) as exc:
        raise ModelError("segment", f"{segment!r} is not a number of seconds") from exc
    if value <= 0:
        raise ModelError("segment", f"must be positive, got {segment!r}")
    return value


def demucs_plan(module, segment: float | None = None, overlap: float = OVERLAP, shifts: int = 0,
                batch_size: int = 1, seed: int = 0, shift_offsets: list[list[int]] | None = None, model_call=None):
    """The :class:`DemucsPlan` that runs ``module`` (an :class:`umxtools.models.htdemucs.HTDemucs` or
    ``HTDemucsBag``: anything with ``members()``, ``targets``, ``sample_rate``) as ``apply_model`` would.

    ``segment`` (seconds) replaces each member's own, and may not exceed it (a transformer only
    sees positions it was trained on; demucs refuses it too). ``model_call(member)`` wraps each
    member's callable (the separator's shape checks); by default members are called directly.
    """
    members = []
    for model, weights in module.members():
        if segment is not None and as_fraction(segment) > Fraction(model.segment):
            raise ModelError("htdemucs", f"segment {segment} s is longer than the {float(model.segment):g} s this model was "
                                         "trained on; give a shorter one or none")
        length = int(model.samplerate * segment) if segment is not None else int(model.samplerate * model.segment)
        call = model_call(model) if model_call is not None else model
        members.append(DemucsMember(call, length, weights))
    return DemucsPlan(members, nb_sources=len(module.targets), max_shift=int(0.5 * module.sample_rate), overlap=overlap,
                      shifts=shifts, batch_size=batch_size, seed=seed, shift_offsets=shift_offsets)


def draw_shift_offsets(nb_members: int, shifts: int, max_shift: int, seed: int) -> list[list[int]]:
    """The offsets demucs draws after ``random.seed(seed)``: member by member, shift by shift."""
    rng = random.Random(seed)
    return [[rng.randint(0, max_shift) for _ in range(shifts)] for _ in range(nb_members)]


# --- MSST ----------------------------------------------------------------------------------------


@dataclass
class MsstPlan:
    """MSST's ``demix`` (generic mode) as a stream; ``model`` maps ``(batch, channels, chunk_size)``
    to ``(batch, sources, channels, chunk_size)``."""

    model: Model
    nb_sources: int
    chunk_size: int
    num_overlap: int = 4
    batch_size: int = 1
    held: int = 0  # largest number of samples buffered (tests)

    def __post_init__(self):
        if self.chunk_size < 10:
            raise ValueError(f"chunk_size must be at least 10 samples (MSST fades over chunk_size // 10), got {self.chunk_size}")
        if not 1 <= self.num_overlap <= self.chunk_size or self.batch_size < 1:
            raise ValueError(f"num_overlap must be within [1, chunk_size] and batch_size >= 1 "
                             f"(got {self.num_overlap}, {self.batch_size})")

    def _layout(self, length: int) -> tuple[int, int, list[int]]:
        """``(border, padded length, chunk starts)``; ``border`` is 0 when MSST does not pad."""
        step = self.chunk_size // self.num_overlap
        border = self.chunk_size - step
        if not (length > 2 * border and border > 0):
            border = 0
        padded = length + 2 * border
        return border, padded, list(range(0, padded, step))

    def nb_segments(self, length: int) -> int:
        return len(self._layout(length)[2])

    def _windows(self, nb_chunks: int) -> list[torch.Tensor]:
        c, fade = self.chunk_size, self.chunk_size // 10
        base = torch.ones(c)
        base[-fade:] = torch.linspace(1, 0, fade)
        base[:fade] = torch.linspace(0, 1, fade)
        last_batch = (nb_chunks - 1) // self.batch_size
        windows = []
        for k in range(nb_chunks):
            batch = k // self.batch_size
            w = base.clone()
            if min(nb_chunks, (batch + 1) * self.batch_size) - 1 == 0:  # the batch ends with the first chunk
                w[:fade] = 1
            elif batch == last_batch:
                w[-fade:] = 1
            windows.append(w)
        return windows

    def _chunk(self, audio: torch.Tensor, border: int, padded: int, start: int) -> torch.Tensor:
        """Chunk ``start`` of the padded signal, padded to ``chunk_size``: ``(channels, chunk_size)``."""
        length = audio.shape[-1]
        n = min(self.chunk_size, padded - start)
        reflect = n > self.chunk_size // 2
        stop = start + (self.chunk_size if reflect else n)
        p = torch.arange(start, stop, device=audio.device)
        p = torch.where(p > padded - 1, 2 * (padded - 1) - p, p)  # the chunk's own reflection at the end
        q = (p - border).abs()  # the song's reflection padding
        q = torch.where(q > length - 1, 2 * (length - 1) - q, q)
        x = audio[:, q]
        return x if reflect else F.pad(x, (0, self.chunk_size - n))

    def blocks(self, audio: torch.Tensor, progress: Progress = _no_progress) -> Iterator[torch.Tensor]:
        """Consecutive ``(sources, channels, n)`` blocks covering ``audio`` ``(channels, samples)``."""
        length = audio.shape[-1]
        border, padded, starts = self._layout(length)
        windows = [w.to(audio.device) for w in self._windows(len(starts))]
        ola = _WeightedSum((self.nb_sources, audio.shape[0]), audio.device)
        self.held = 0
        emitted = 0  # song samples handed on
        for first in range(0, len(starts), self.batch_size):
            ks = range(first, min(len(starts), first + self.batch_size))
            x = torch.stack([self._chunk(audio, border, padded, starts[k]) for k in ks])
            y = self.model(x)  # (batch, sources, channels, chunk_size)
            for j, k in enumerate(ks):
                n = min(self.chunk_size, padded - starts[k])
                ola.add(starts[k], y[j, ..., :n], windows[k][:n])
                self.held = max(self.held, ola.held)
                done = torch.nan_to_num(ola.take(starts[k + 1] if k + 1 < len(starts) else padded), nan=0.0)
                # padded positions [ola.start - n, ola.start) -> song positions minus the border
                a = ola.start - done.shape[-1] - border
                lo, hi = max(0, -a), min(done.shape[-1], length - a)
                if hi > lo:
                    emitted += hi - lo
                    yield done[..., lo:hi]
                progress("advance", {"n": 1})
        assert emitted == length, (emitted, length)


def run_whole(plan: DemucsPlan | MsstPlan, audio: torch.Tensor) -> torch.Tensor:
    """All blocks of ``plan`` at once: ``(sources, channels, samples)`` (tests, short inputs)."""
    return torch.cat(list(plan.blocks(audio)), dim=-1)


# --- which rule a model gets -----------------------------------------------------------------------


def plan_for(model, settings, call: Callable[[Model], Model] = lambda m: m) -> DemucsPlan | MsstPlan | None:
    """The plan a :class:`~umxtools.models.loading.SeparationModel` is separated with, or None.

    The rule is the model's ``segmenting`` (an MSST checkpoint, or a model.json that records one)
    or its module class's (``umxtools.models.htdemucs``); models without one are not segment-based.
    ``settings`` (:class:`~umxtools.separation.SeparationSettings`): ``segment`` replaces the
    model's segment (demucs) or ``chunk_size`` (MSST, in seconds); ``overlap``, ``shifts``,
    ``seed`` are demucs's; ``num_overlap`` MSST's; ``batch_size`` both. ``call(model)`` wraps
    each model callable (shape checks, mono input).
    """
    spec = model.segmenting or (getattr(model.module, "segmenting", None) if model.module is not None else None)
    if not spec:
        return None
    where = model.identity.get("source")
    rule = spec.get("rule") if isinstance(spec, dict) else None
    try:
        if rule == "demucs":
            if not callable(getattr(model.module, "members", None)):
                raise ModelError(where, f"segmenting rule 'demucs' needs an HTDemucs model, not {type(model.module).__name__}")
            return demucs_plan(model.module, segment=settings.segment, overlap=settings.overlap, shifts=settings.shifts,
                               batch_size=settings.batch_size or 1, seed=settings.seed, model_call=call)
        if rule == "msst":
            if settings.shifts:
                raise UsageError(None, "shifts are demucs's; MSST's inference has none")
            chunk = int(settings.segment * model.sample_rate) if settings.segment else spec.get("chunk_size")
            if not isinstance(chunk, int):
                raise ModelError(where, f"segmenting rule 'msst' needs an integer chunk_size, has {chunk!r}")
            return MsstPlan(call(model.module), len(model.module_targets), chunk, settings.num_overlap or spec.get("num_overlap", 4),
                            settings.batch_size or spec.get("batch_size", 1))
    except ValueError as exc:
        raise UsageError(None, str(exc)) from exc
    raise ModelError(where, f"unknown segmenting rule {rule!r} (demucs or msst)")
