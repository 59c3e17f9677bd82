"""Training separation models from caches: open-unmix's training loop, for every model kind.

:func:`train` follows ``openunmix/scripts/train.py``: random excerpts of the training cache
(:class:`umxtools.loaders.RandomDataset`, open-unmix's sampler), Adam with weight decay,
``ReduceLROnPlateau`` on the validation loss (factor ``lr_decay_gamma``, patience
``lr_decay_patience``, cooldown 10), open-unmix's early stopping, validation on whole tracks of the
validation cache each epoch, and the best weights kept by validation loss. Without a validation
cache (``valid=None``) there is no validation: the weights kept are the last epoch's, the
scheduler watches the training loss and there is no early stopping (docs/train.md, "Training
without validation"). The model is one of:

- ``umx`` (one target): open-unmix's ``OpenUnmix``, input normalisation from the cache's
  mixture statistics, loss = MSE between estimated and true target magnitudes;
- ``umx`` with ``joint``: :class:`umxtools.models.OpenUnmixJoint`, one UMX per target, loss =
  the sum over targets of the per-target MSE (open-unmix's "Jointly train targets" guide);
- ``waveform``: :class:`umxtools.models.Demucs` (Demucs v2), trained on waveforms with
  ``--loss`` (L1, MSE, SDR, multi-resolution STFT or a sum of them) summed over targets;
- ``MODULE:CLASS``: a user's model following examples/template_model.py, spectrogram (MSE on
  magnitudes) or waveform (``--loss``) according to its ``kind`` attribute.

Everything is checked before anything is written (caches, targets, STFT settings, the model, the
output folder, the checkpoint to resume), so bad input leaves no files. Rank 0 then holds an
exclusive lock on the run (``OUT/.<run>.chkpnt.lock``, :func:`umxtools.fileio.exclusive`) while it
decides whether to resume or replace and for the whole training: a second ``train`` of the same
run into the same folder fails at once, naming the holder. Under ``torchrun`` the
same function runs in every process (DistributedDataParallel; each rank draws its own share of
the random excerpts; rank 0 alone writes). The files are described in docs/model-format.md and
docs/train.md. What a run is (flags, caches, model, datasets) is checked by
:mod:`umxtools.train_setup`; losses and early stopping are :mod:`umxtools.losses`'; the files
and their keys :mod:`umxtools.model_folder`'s, and when a run resumes :mod:`umxtools.checkpoints`'.

Shapes: spectrogram models take ``x`` ``(batch, channels, bins, frames)`` and return
``(batch, targets, channels, bins, frames)``; waveform models take ``(batch, channels, samples)``
and return ``(batch, targets, channels, samples)``. Targets ``y`` always have the targets axis.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from umxtools import distributed, fileio
from umxtools.batching import CacheLoader
from umxtools.cache import check_cache
from umxtools.checkpoints import plan_output, remove_stale_tmp, resume_from, rng_state, set_rng_state
from umxtools.curves import write_curves
from umxtools.errors import CacheError, CheckpointError, TrainingError, UmxError, UsageError
from umxtools.evaluation import USDR_DELTA
from umxtools.losses import EarlyStopping, loss_function
from umxtools.model_folder import (
    Progress,
    RunFiles,
    check_separator,
    checkpoint,
    metadata_current,
    run_identity,
    save_torch,
    separator_conf,
    write_metadata,
    write_weights,
)
from umxtools.models import ModelError
from umxtools.schedules import lr_factor, update_ema
from umxtools.train_setup import AMP_DTYPES, Plan, TrainConfig, pick_device, prepare, short_tracks

# the loss curves cost 0.3-0.5 s: redrawn at most this often, and when training ends
CURVES_EVERY_S = 30.0

Reporter = Callable[[str, dict], None]


# --- public ------------------------------------------------------------------------------------


def train(config: TrainConfig, report: Reporter | None = None) -> Path:
    """Train as ``config`` says; the output folder. ``report(event, info)`` receives progress
    (events ``start``, ``batch``, ``epoch``, ``stop``) and messages a user must see even without
    progress (``note``: ``{"message": "PATH: ..."}``: no validation, tracks too short to be
    sampled, a resumed run with nothing to do) in the main process only.

    Raises :class:`umxtools.errors.UmxError` subclasses for bad input (before writing anything),
    :class:`UsageError` for ``--resume`` with fewer ``epochs`` than the checkpoint holds (nothing
    written), :class:`TrainingError` for a NaN loss and :class:`CacheError` for a validation
    cache whose data is damaged (the last good checkpoint is kept).
    """
    ctx = distributed.from_env()
    device = pick_device(config.device, ctx)
    if config.amp == "fp16" and device.type != "cuda":  # torch's CPU autocast runs bfloat16; fp16 needs the CUDA scaler
        raise UsageError(None, f"--amp fp16 needs a CUDA device (on {device.type}: --amp bf16, or float32 without --amp)")
    plan = prepare(config)
    with _holding(plan.files, ctx):
        plan_output_of(plan)
        distributed.setup(ctx, device)
        try:
            _Trainer(plan, ctx, device, report if ctx.main else None).fit()
        finally:
            distributed.teardown(ctx)
    return config.output


@contextlib.contextmanager
def _holding(files: RunFiles, ctx: distributed.Context):
    """Rank 0: the output folder checked writable and the run's lock held for the block.

    A folder this call created is removed again if it is still empty at the end (bad input found
    under the lock, a NaN loss in the first epoch): a failed run leaves no files.
    """
    if not ctx.main:
        yield
        return
    folder = files.folder
    created = not folder.exists()
    try:
        fileio.check_writable(folder)
        with fileio.exclusive(files.checkpoint):
            yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty


def plan_output_of(plan: Plan) -> None:
    """Whether to resume (the checkpoint, checked against the flags) and which files of an earlier
    run ``--force`` replaces; refuses a folder holding another run. Nothing is written here."""
    config, info = plan.config, plan.info
    resume, plan.delete = plan_output(info.files, config.force, config.resume)
    check_separator(info.files, separator_conf(info.sample_rate, info.n_fft, info.n_hop, info.nb_channels))
    if resume:
        plan.resume = resume_from(info.files, run_identity(info), config.epochs)


# --- what a user is told -------------------------------------------------------------------------


def _start_notes(plan: Plan) -> list[str]:
    """What a user must know before the first epoch, even with ``-q``."""
    c, meta, notes = plan.config, plan.meta, []
    if plan.init_note is not None:
        notes.append(f"{plan.files.folder}: {plan.init_note}")
    if plan.valid_set is None:
        notes.append(f"{plan.files.folder}: no --valid: no validation; the weights kept are the last epoch's, the learning rate "
                     "decays when the training loss stops falling, and there is no early stopping (--epochs or --time-limit "
                     "end the run)")
    short = short_tracks(meta, c.seq_dur, plan.spec.kind)
    if short:
        names = ", ".join(repr(t.name) for t in short[:3]) + (", ..." if len(short) > 3 else "")
        notes.append(f"{meta.path}: {len(short)} of {len(meta.tracks)} tracks are shorter than --seq-dur {c.seq_dur:g} s and "
                     f"are never sampled ({names})")
    return notes


def _finished(progress: Progress, config: TrainConfig) -> str | None:
    """Why a resumed run has nothing left to do (None when it has)."""
    trained = progress.epochs_trained
    if progress.stopped_early:
        return (f"the run stopped early after epoch {trained} (no better validation loss in {config.patience} epochs): "
                "nothing to do (--force starts over)")
    if trained >= config.epochs:  # equal: fewer was refused before anything was written
        return f"already trained {trained} epochs (--epochs {config.epochs}): nothing to do (raise --epochs to train longer)"
    return None


def _kept(plan: Plan, epoch: int) -> str:
    """What a run stopped by an error in ``epoch`` leaves behind."""
    if epoch > 1 or plan.resume is not None:
        return f"the checkpoint of epoch {epoch - 1} is kept"
    return "nothing was written"


def _valid_failure(plan: Plan, epoch: int, valid_loss: float, train_loss: float, lr: float) -> UmxError:
    """The error for a non-finite validation loss: the validation cache when its data is
    damaged (its checksums are verified now: one more read of what validation reads every
    epoch), else the model, which diverged."""
    valid, kept = plan.valid_meta.path, _kept(plan, epoch)
    # a stale input (--allow-stale) is no damage: the cache still holds what it was built from
    damage = [p for p in check_cache(valid).problems if not p.endswith("(stale)")]
    if damage:
        more = f" and {len(damage) - 1} more" if len(damage) > 1 else ""
        return CacheError(valid, f"validation loss is {valid_loss} in epoch {epoch}: the validation cache is damaged "
                                 f"({damage[0]}{more}); run umxtools cache check {valid}, and rebuild it; stopped, {kept}")
    return TrainingError(plan.files.folder, f"validation loss is {valid_loss} in epoch {epoch} (training loss {train_loss:.4g}) "
                                            f"and the validation cache is intact: the model diverged; stopped, {kept}; lower --lr "
                                            f"(now {lr:g})")


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """torch's seed for one epoch of one rank: dropout masks differ between ranks, and a resumed
    run draws what an uninterrupted one would."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


# --- the loop ------------------------------------------------------------------------------------


class _Trainer:
    """One process's training: the model, optimiser, scheduler and early stopping over the
    plan's datasets, epoch after epoch; rank 0 hands each epoch's state to :class:`_RunWriter`."""

    def __init__(self, plan: Plan, ctx: distributed.Context, device: torch.device, report: Reporter | None):
        self.plan, self.config, self.ctx, self.device, self.report = plan, plan.config, ctx, device, report
        c = self.config
        self.spec, self.targets = plan.spec, plan.info.targets
        self.model = plan.model.to(device)
        self.net = self.model
        if ctx.distributed:
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        # the plateau decay sets each group's base "lr" (stepped per epoch with --lr-schedule
        # plateau only); warm-up and cosine scale it for each optimiser step (_lr_factor)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=c.lr_decay_gamma,
                                                                    patience=c.lr_decay_patience, cooldown=10)
        self.optimizer_steps = 0
        self.es = EarlyStopping(c.patience)
        self.scaler = torch.amp.GradScaler("cuda", enabled=c.amp == "fp16")
        self.loss_fn = loss_function(plan.info.loss)
        self.train_loader = CacheLoader(plan.train_set, batch_size=c.batch_size, shuffle=True, num_workers=c.nb_workers,
                                        seed=c.seed, rank=ctx.rank, world_size=ctx.world_size)
        self.validates = plan.valid_set is not None
        self.valid_loader = None
        if self.validates:
            # open-unmix validates whole tracks one by one; fixed-length excerpts can share batches
            valid_batch = 1 if c.valid_seq_dur is None else c.batch_size
            self.valid_loader = CacheLoader(plan.valid_set, batch_size=valid_batch, shuffle=False, num_workers=0,
                                            rank=ctx.rank, world_size=ctx.world_size)
        # every rank must take the same number of optimiser steps (each one all-reduces
        # gradients): the smallest share, ceil(floor(n / world) / batch)
        self.nb_batches = -(-(len(plan.train_set) // ctx.world_size) // c.batch_size)
        self.total_steps = c.epochs * -(-self.nb_batches // c.accumulate)  # the cosine's length
        # --ema: the moving average of every float parameter and buffer (from the initial weights);
        # integer buffers (a batch-norm count) are copied as they are
        self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if c.ema else {}
        self.progress = Progress()
        if plan.resume is not None:
            self._restore()
        self.writer = _RunWriter(self) if ctx.main else None

    def _restore(self) -> None:
        state = self.plan.resume
        try:
            self.model.load_state_dict(state.state_dict)
            self.optimizer.load_state_dict(state.optimizer)
            self.scheduler.load_state_dict(state.scheduler)
            if self.scaler.is_enabled() and state.scaler:
                self.scaler.load_state_dict(state.scaler)
            self.es.load_state_dict(state.early_stopping)
            self.optimizer_steps = state.optimizer_steps
            if self.ema:
                if set(state.ema) != set(self.ema):
                    raise KeyError("its 'ema' entry does not hold the model's weights")
                self.ema = {k: v.to(self.device) for k, v in state.ema.items()}
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise CheckpointError(state.path, f"does not fit the model and optimiser the flags describe ({first}); "
                                              "pass --force to start over") from exc
        self.progress = Progress(state.progress.epochs_trained, state.progress.best_epoch, state.progress.stopped_early,
                                 list(state.progress.history))
        set_rng_state(state.rng)

    def checkpoint(self) -> dict:
        """This process's state after the last epoch, as ``<run>.chkpnt`` holds it."""
        return checkpoint(self.plan.info, self.progress, state_dict=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                          scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict() if self.scaler.is_enabled() else {},
                          early_stopping=self.es.state_dict(), world_size=self.ctx.world_size, rng=rng_state(),
                          optimizer_steps=self.optimizer_steps, ema=self.ema)

    def fit(self) -> None:
        c, ctx = self.config, self.ctx
        if ctx.main:
            remove_stale_tmp(self.plan.files)
            for p in self.plan.delete:  # --force: the earlier run goes only now that every check passed
                p.unlink(missing_ok=True)
        finished = _finished(self.progress, c)
        if finished is not None:
            # a finished run resumed (a requeued job, a Makefile rerun with the same EPOCHS): say
            # so and write nothing, unless a kill left the derived files behind the checkpoint
            if ctx.main and not metadata_current(self.plan.files, self.progress.epochs_trained):
                self.writer.heal()
                finished += "; the files derived from the checkpoint were rewritten"
            distributed.barrier(ctx)
            self._emit("note", {"message": f"{self.plan.files.checkpoint}: {finished}"})
            return
        if ctx.main and self.plan.resume is not None:
            self.writer.heal()
        distributed.barrier(ctx)
        self._emit("start", {"first_epoch": self.progress.epochs_trained + 1, "epochs": c.epochs, "batches": self.nb_batches,
                             "device": str(self.device), "world_size": ctx.world_size, "model": self.spec.cls,
                             "parameters": sum(p.numel() for p in self.model.parameters()), "targets": self.targets,
                             "output": str(self.plan.files.folder), "resumed": self.plan.resume is not None,
                             "validates": self.validates})
        for note in _start_notes(self.plan):
            self._emit("note", {"message": note})
        started = time.perf_counter()
        for epoch in range(self.progress.epochs_trained + 1, c.epochs + 1):
            torch.manual_seed(_epoch_seed(c.seed, epoch, ctx.rank))
            t0 = time.perf_counter()
            train_loss, train_parts, samples, speed, wait = self._train_epoch(epoch)
            valid_sdr = None
            if self.validates:
                valid_loss, valid_parts, valid_sdr = self._valid_epoch()
                if not math.isfinite(valid_loss):
                    raise _valid_failure(self.plan, epoch, valid_loss, train_loss, self.optimizer.param_groups[0]["lr"])
                # --valid-metric sdr: the plateau decay and early stopping minimise -uSDR
                score = valid_loss if valid_sdr is None else -valid_sdr
                if c.lr_schedule == "plateau":
                    self.scheduler.step(score)
                stop = self.es.step(score)
                best = score == self.es.best  # open-unmix's test
            else:
                # no validation: the learning rate still decays when the training loss stops
                # falling (the optimiser is stuck, whatever the model generalises); early stopping
                # guards against overfitting, which only a held-out loss shows, so it is off, and
                # every epoch's weights are kept (best == last)
                valid_loss, valid_parts = None, [None] * len(self.targets)
                if c.lr_schedule == "plateau":
                    self.scheduler.step(train_loss)
                stop, best = False, True
            row = {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss, "valid_sdr": valid_sdr, "best": best,
                   "lr": self.optimizer.param_groups[0]["lr"] * self._lr_factor(self.optimizer_steps - 1), "seconds": round(time.perf_counter() - t0, 3),
                   "samples": samples, "samples_per_s": round(speed, 2), "data_wait": round(wait, 4)}
            if len(self.targets) > 1:
                for t, tl, vl in zip(self.targets, train_parts, valid_parts):
                    row[f"train_loss_{t}"], row[f"valid_loss_{t}"] = tl, vl
            p = self.progress
            p.history.append(row)
            p.epochs_trained, p.stopped_early, p.best_epoch = epoch, stop, epoch if best else p.best_epoch
            out_of_time = c.time_limit is not None and time.perf_counter() - started >= 60 * c.time_limit
            if c.time_limit is not None:  # every rank must stop after the same epoch: any clock decides
                out_of_time = distributed.all_sum([float(out_of_time)], ctx, self.device)[0] > 0
            if ctx.main:
                self.writer.save(best, final=stop or out_of_time or epoch == c.epochs)
            best_row = next(r for r in p.history if r["epoch"] == p.best_epoch)
            self._emit("epoch", {**row, "epochs": c.epochs, "best_epoch": p.best_epoch, "best_loss": best_row["valid_loss"]})
            if stop:
                metric = "validation uSDR" if c.valid_metric == "sdr" else "validation loss"
                self._emit("stop", {"epoch": epoch, "reason": f"early stopping (no better {metric} in {c.patience} epochs)"})
                break
            if out_of_time:
                self._emit("stop", {"epoch": epoch, "reason": f"time limit ({c.time_limit:g} min); --resume continues"})
                break
        distributed.barrier(ctx)

    def _emit(self, event: str, info: dict) -> None:
        if self.report is not None:
            self.report(event, info)

    def _prepare_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.config.nb_channels == 1:
            # open-unmix's mono models see the channel mean (ComplexNorm(mono=True) for magnitudes)
            x, y = x.mean(1, keepdim=True), y.mean(2, keepdim=True)
        return x, y

    def _forward(self, net, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-target losses ``(targets,)`` of one batch."""
        return self.loss_fn(self._estimate(net, x, y), y, x)

    def _estimate(self, net, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The model's estimates of one batch, shaped as ``y``, in float32."""
        amp = self.config.amp
        with torch.autocast(self.device.type, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext():
            out = net(x)
        if isinstance(out, (list, tuple)):  # the guide's OpenUnmixJoint returns a list of targets
            out = torch.stack(list(out), dim=1)
        if out.dim() == y.dim() - 1 and y.shape[1] == 1:
            out = out.unsqueeze(1)  # a single-target model may leave out the targets axis
        if out.shape != y.shape:
            axes = "(batch, targets, channels, bins, frames)" if self.spec.kind == "spectrogram" else "(batch, targets, channels, samples)"
            raise ModelError(self.spec.cls, f"forward returned shape {tuple(out.shape)}, expected {tuple(y.shape)} {axes}")
        return out.float()

    def _train_epoch(self, epoch: int) -> tuple[float, list[float], int, float, float]:
        """Mean training loss (weighted by batch size, over all ranks), per-target means, samples
        (all ranks), samples/s, and the share of the step time spent waiting for data."""
        c = self.config
        self.net.train()
        self.train_loader.sampler.set_epoch(epoch)
        k = len(self.targets)
        total = [0.0] * (k + 1)  # per-target loss sums, sample count
        wait = elapsed = 0.0
        it = iter(self.train_loader)
        try:
            for b in range(self.nb_batches):
                t0 = time.perf_counter()
                x, y = next(it)
                t1 = time.perf_counter()
                x, y = self._prepare_batch(x, y)
                first = b - b % c.accumulate  # the first batch of this optimiser step's group
                group = min(c.accumulate, self.nb_batches - first)  # the epoch's last group may be shorter
                if b == first:
                    self.optimizer.zero_grad(set_to_none=True)
                parts = self._forward(self.net, x, y)
                loss = parts.sum()
                # the mean gradient of the group's batches (exactly loss's with --accumulate 1)
                self.scaler.scale(loss / group if group > 1 else loss).backward()
                if b == first + group - 1:
                    self._step()
                n = x.shape[0]
                # one collective per step: progress shows the global loss, and a NaN on any rank
                # stops every rank at the same step
                step = distributed.all_sum([*(parts.detach() * n).tolist(), float(n)], self.ctx, self.device)
                if not all(math.isfinite(v) for v in step):
                    raise TrainingError(self.plan.files.folder, f"loss is NaN in epoch {epoch} (batch {b + 1}); stopped, {_kept(self.plan, epoch)}; "
                                                           "lower --lr or check the data")
                total = [a + v for a, v in zip(total, step)]
                t2 = time.perf_counter()
                wait, elapsed = wait + (t1 - t0), elapsed + (t2 - t0)
                self._emit("batch", {"epoch": epoch, "batch": b + 1, "batches": self.nb_batches,
                                     "loss": sum(total[:k]) / total[k], "samples_per_s": step[k] / max(t2 - t0, 1e-9)})
        finally:
            it.close()  # stops the loader's workers when the rank's share was cut short
        count = total[k]
        parts = [v / count for v in total[:k]]
        return sum(parts), parts, int(count), count / max(elapsed, 1e-9), wait / max(elapsed, 1e-9)

    def _lr_factor(self, step: int) -> float:
        c = self.config
        return lr_factor(step, c.warmup_steps, c.lr_schedule, self.total_steps)

    def _step(self) -> None:
        """One optimiser step on the accumulated gradients: clipped to ``--clip-grad-norm``, at the
        learning rate of the schedule; the groups' base rates (the plateau decay's) are kept."""
        c = self.config
        if c.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad_norm)
        factor = self._lr_factor(self.optimizer_steps)
        base = [g["lr"] for g in self.optimizer.param_groups]
        if factor != 1.0:
            for g, lr in zip(self.optimizer.param_groups, base):
                g["lr"] = lr * factor
        self.scaler.step(self.optimizer)
        self.scaler.update()
        for g, lr in zip(self.optimizer.param_groups, base):
            g["lr"] = lr
        self.optimizer_steps += 1
        self._update_ema()

    def _update_ema(self) -> None:
        if self.config.ema:
            update_ema(self.ema, self.model.state_dict(), self.config.ema)

    def _valid_epoch(self) -> tuple[float, list[float], float | None]:
        """Mean validation loss over the validation excerpts (whole tracks by default), all ranks,
        its per-target parts, and with ``--valid-metric sdr`` the mean uSDR over targets and
        excerpts (None otherwise)."""
        assert self.valid_loader is not None
        self.model.eval()
        k = len(self.targets)
        total = [0.0] * (k + 3)  # per-target loss sums, excerpt count, uSDR sum, uSDR count
        with torch.no_grad():
            for x, y in self.valid_loader:
                x, y = self._prepare_batch(x, y)
                out = self._estimate(self.model, x, y)
                parts = self.loss_fn(out, y, x)
                sdr = usdr(y, out) if self.config.valid_metric == "sdr" else torch.zeros(0)
                step = [*(parts * x.shape[0]).tolist(), float(x.shape[0]), float(sdr.sum()), float(sdr.numel())]
                total = [a + v for a, v in zip(total, step)]
        total = distributed.all_sum(total, self.ctx, self.device)
        parts = [v / total[k] for v in total[:k]]
        return sum(parts), parts, (total[k + 1] / total[k + 2] if total[k + 2] else None)


def usdr(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """The MDX whole-signal SDR (:func:`umxtools.evaluation.whole_track_sdr`, same epsilon) of
    each item and target: ``(batch, targets, channels, samples)`` -> ``(batch, targets)``, in dB."""
    ref, est = reference.double(), estimate.double()
    num = ref.square().sum((2, 3)) + USDR_DELTA
    den = (ref - est).square().sum((2, 3)) + USDR_DELTA
    return 10 * torch.log10(num / den)


# --- files (rank 0) ----------------------------------------------------------------------------


class _RunWriter:
    """Rank 0's writes after each epoch: the weights (when best) first, then the checkpoint, then
    what derives from it (docs/model-format.md), so a kill at any point leaves a resumable run."""

    def __init__(self, trainer: _Trainer):
        self.trainer, self.info = trainer, trainer.plan.info
        self.curves_drawn = -math.inf

    def save(self, best: bool, final: bool) -> None:
        if best:
            self._save_weights()
        save_torch(self.info.files.checkpoint, self.trainer.checkpoint())
        self._write_derived(final)

    def heal(self) -> None:
        """After a kill: the derived files of the checkpoint's epoch, and its weights if it was the
        best (always, without validation)."""
        progress = self.trainer.progress
        if progress.best_epoch == progress.epochs_trained:
            self._save_weights()
        if progress.history:
            self._write_derived(final=True)

    def _save_weights(self) -> None:
        model, ema = self.trainer.model, self.trainer.ema
        exports = model.target_models() if self.info.files.exports else {}
        prefixes = {id(m): name for name, m in model.named_modules()}
        ema_exports = {}
        for t, part in exports.items():  # each part's slice of the average, under the part's own names
            prefix = prefixes[id(part)] + "."
            ema_exports[t] = {k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)}
        write_weights(self.info.files, model.state_dict(), {t: part.state_dict() for t, part in exports.items()},
                      ema, ema_exports if ema else None)

    def _write_derived(self, final: bool) -> None:
        write_metadata(self.info, self.trainer.progress, self.trainer.es.num_bad_epochs)
        if final or time.perf_counter() - self.curves_drawn >= CURVES_EVERY_S:
            write_curves(self.info.files)
            self.curves_drawn = time.perf_counter()
