"""Batches from a cache dataset: a sampler that carries the epoch, and the fast loader.

:class:`CacheLoader` is what training uses. Worker processes assemble whole batches straight into
a ring of shared-memory buffers that the parent hands out and takes back once the consumer has
dropped every tensor viewing them. A DataLoader allocates new shared memory for every batch, and
first-touching fresh pages costs more here than the sampling itself (3.8 ms per 4 MB batch slice
against 0.45 ms to rewrite touched memory): reusing buffers is what makes the cache fast.

The datasets themselves stay plain ``torch.utils.data.Dataset`` objects and work with any
DataLoader; this module only makes them faster.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
from collections.abc import Iterator

import numpy as np
import torch

from umxtools.audio import _first_line
from umxtools.errors import CacheError, UmxError
from umxtools.loaders import RandomDataset, _CacheDataset


class EpochBatchSampler:
    """Yields ``(epoch, batch indices)``: a seeded permutation per epoch, split across ranks.

    The epoch travels with every batch, so worker processes never act on a stale epoch.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size, self.epoch = drop_last, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.size) if self.shuffle else np.arange(self.size)
        return order[self.rank::self.world_size]  # each rank its own share (distributed training)

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        order = self._indices()
        for b in range(len(self)):
            yield self.epoch, tuple(int(i) for i in order[b * self.batch_size:(b + 1) * self.batch_size])


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _Ring:
    """Batch buffers, reused only when no tensor outside the ring still views them."""

    def __init__(self, dataset: _CacheDataset, batch_size: int, size: int, shared: bool):
        x_shape, y_shape, dtype = dataset.batch_shapes(batch_size)
        self.buffers = []
        for _ in range(size):
            pair = (torch.empty(x_shape, dtype=dtype), torch.empty(y_shape, dtype=dtype))
            if shared:
                pair = tuple(t.share_memory_() for t in pair)
            self.buffers.append(pair)
        self.idle = _use_count(self.buffers[0][0])  # the count while only the ring holds a buffer
        self.busy: set[int] = set()  # handed to a worker, result not yet yielded

    def take(self) -> int | None:
        for k, (x, y) in enumerate(self.buffers):
            if k not in self.busy and _use_count(x) == self.idle and _use_count(y) == self.idle:
                self.busy.add(k)
                return k
        return None

    def hand_out(self, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of buffer ``k`` (the first ``n`` items): they keep it taken while referenced."""
        self.busy.discard(k)
        x, y = self.buffers[k]
        return x[:n].detach(), y[:n].detach()


def _worker(dataset: _CacheDataset, buffers, tasks, results) -> None:
    torch.set_num_threads(1)  # one core per worker process, as DataLoader workers
    while True:
        task = tasks.get()
        if task is None:
            return
        seq, epoch, indices, k = task
        try:
            if isinstance(dataset, RandomDataset):
                dataset.set_epoch(epoch)
            n = len(indices)
            dataset.get_batch(list(indices), out=(buffers[k][0][:n], buffers[k][1][:n]))
            results.put((seq, None))
        except UmxError as exc:
            results.put((seq, exc))
        except Exception as exc:  # anything else travels back as one line: it may not pickle
            results.put((seq, CacheError(dataset.meta.path, f"a loader worker failed ({type(exc).__name__}: {_first_line(exc)})")))


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}" + (", out of memory?" if -exitcode == signal.SIGKILL else "")
    return f"exit code {exitcode}"


class CacheLoader:
    """Iterate ``(x, y)`` batches of a cache dataset; shapes as in :mod:`umxtools.loaders`.

    ``num_workers=0`` assembles batches in the calling process (torch may still use several
    threads per operation); ``num_workers=N`` uses N worker processes (fork) and up to
    ``2 * N + 2`` shared buffers. A yielded batch stays valid for as long as it is referenced: its
    buffer is reused only after every tensor viewing it is gone. Call ``loader.sampler.set_epoch``
    before each epoch for new excerpts and a new order.
    """

    def __init__(self, dataset: _CacheDataset, batch_size: int = 16, shuffle: bool = True, num_workers: int = 0,
                 seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed, drop_last, rank, world_size)
        self._ring: _Ring | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.dataset.seq_frames is None:
            # whole tracks: variable shapes, no ring; batches are built one by one
            for epoch, indices in self.sampler:
                self._set_epoch(epoch)
                yield self.dataset.get_batch(list(indices))
            return
        if self.num_workers == 0:
            yield from self._serial()
        else:
            yield from self._parallel()

    def _set_epoch(self, epoch: int) -> None:
        if isinstance(self.dataset, RandomDataset):
            self.dataset.set_epoch(epoch)

    def _serial(self):
        if self._ring is None:
            self._ring = _Ring(self.dataset, self.batch_size, 2, shared=False)
        for epoch, indices in self.sampler:
            self._set_epoch(epoch)
            k = self._ring.take()
            if k is None:  # the consumer holds every buffer: this batch gets its own memory
                yield self.dataset.get_batch(list(indices))
                continue
            x, y = self._ring.buffers[k]
            self.dataset.get_batch(list(indices), out=(x[:len(indices)], y[:len(indices)]))
            yield self._ring.hand_out(k, len(indices))

    def _parallel(self):
        if self._ring is None or not self._ring.buffers[0][0].is_shared():
            self._ring = _Ring(self.dataset, self.batch_size, 2 * self.num_workers + 2, shared=True)
        ring = self._ring
        # fork, and its own processes rather than umxtools.workers.pool (spawn): the workers
        # inherit the dataset (index tables, the cache's path and settings) and the shared batch
        # buffers they fill in place, with nothing pickled per epoch, as torch's own DataLoader
        # forks on Linux. Fork is unsafe after torch has run only for a child that enters a
        # parallel region of the inherited thread pool; these workers switch to one thread
        # (_worker) and only copy and scale cache data into the buffers
        ctx = multiprocessing.get_context("fork")
        tasks, results = ctx.Queue(), ctx.Queue()
        workers = [ctx.Process(target=_worker, args=(self.dataset, ring.buffers, tasks, results), daemon=True)
                   for _ in range(self.num_workers)]
        for w in workers:
            w.start()
        try:
            pending = enumerate(self.sampler)  # (seq, (epoch, indices)), dispatched in order
            inflight: dict[int, tuple[int, int]] = {}  # seq -> (buffer, items)
            done: dict[int, BaseException | None] = {}
            next_seq = 0
            while True:
                while len(inflight) < 2 * self.num_workers and (k := ring.take()) is not None:
                    item = next(pending, None)
                    if item is None:
                        ring.busy.discard(k)
                        break
                    seq, (epoch, indices) = item
                    inflight[seq] = (k, len(indices))
                    tasks.put((seq, epoch, indices, k))
                if next_seq not in inflight:
                    # dispatching is in order, so nothing is in flight: either the epoch is over or
                    # the consumer holds every buffer, and this batch is built here in new memory
                    item = next(pending, None)
                    if item is None:
                        return
                    _, (epoch, indices) = item
                    self._set_epoch(epoch)
                    next_seq += 1
                    yield self.dataset.get_batch(list(indices))
                    continue
                while next_seq not in done:
                    try:
                        seq, error = results.get(timeout=1.0)  # how soon a dead worker is noticed
                    except queue.Empty:
                        dead = [w for w in workers if not w.is_alive()]
                        if dead:
                            raise CacheError(self.dataset.meta.path, f"a loader worker process died ({_how(dead[0].exitcode)}) "
                                                                     "while reading it; rerun with fewer workers if memory is short") from None
                        continue
                    done[seq] = error
                error = done.pop(next_seq)
                k, n = inflight.pop(next_seq)
                if error is not None:
                    ring.busy.discard(k)
                    raise error
                next_seq += 1
                yield ring.hand_out(k, n)
        finally:
            for _ in workers:
                tasks.put(None)
            for w in workers:
                w.join(timeout=5)
                if w.is_alive():
                    w.terminate()
            ring.busy.clear()
