"""The data order contract: step s of any run, on any world size, sees the same global batch.

Epoch e is a seeded bijection over all train rows (a Feistel network with cycle-walking: O(1) memory, no O(rows)
array on any rank); the stream of epochs is cut into global batches of B rows, so step s takes stream positions
[s·B, (s+1)·B). Rank r of W takes its contiguous share of them (shares differ by at most one row when W does not
divide B) in micro-batches of at most `micro_batch` rows. Every rank runs the same number of micro-batches, the
longest share's; a rank whose share is shorter pads with empty ones (zero-weight passes, so FSDP's collectives
line up). There is no iterator state to save: the step is the cursor. A mixture of sources (--data.mix) keeps the
contract with another map of a step's positions to rows (trainer/mixture.py).
"""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from raylm.dataset import Split
from raylm.errors import ConfigError
from raylm.permutation import Permutation

TRAIN_STREAM, VAL_STREAM = 0, 1
"""Seed streams: the train epochs' permutations and the validation slice's never share a key."""


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch of sequences is split across ranks and micro-batches."""

    global_batch: int
    micro_batch: int
    world: int

    def __post_init__(self):
        if self.world > self.global_batch:
            raise ConfigError(f"train.global_batch={self.global_batch} is smaller than the {self.world} workers: each "
                              "worker needs at least one sequence per step; raise it or use fewer workers")

    def share(self, rank: int) -> tuple[int, int]:
        """[start, stop) of rank's rows within the step's global batch: contiguous, sizes differing by at most 1."""
        return split_evenly(self.global_batch, self.world, rank)

    @property
    def grad_accum(self) -> int:
        """Micro-batches every rank runs per step (the longest share's count)."""
        return micro_batch_count(self.global_batch, self.world, self.micro_batch)


def check_fits(dataset, *, global_batch: int, world: int, needs_val: bool = False) -> None:
    """Refuse, before any compute, a job the dataset cannot serve: fewer train rows than one step takes (a step
    would repeat rows), or no validation rows when validation loss is what the job decides on (Tune)."""
    BatchPlan(global_batch=global_batch, micro_batch=1, world=world)
    rows = len(dataset.train)
    if rows < global_batch:
        raise ConfigError(f"dataset {dataset.directory} has {rows} train rows, fewer than one step takes "
                          f"(train.global_batch={global_batch}); lower it or prepare more data")
    if needs_val and len(dataset.val) == 0:
        raise ConfigError(f"dataset {dataset.directory} has no validation rows, and the study compares trials on "
                          "validation loss; prepare it with a larger --val-fraction or more data")


def split_evenly(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` items are cut into `parts` contiguous runs differing by <= 1."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def micro_batch_count(total: int, parts: int, micro_batch: int) -> int:
    """Micro-batches of at most `micro_batch` rows the longest of `parts` even shares of `total` rows needs."""
    return math.ceil(math.ceil(total / parts) / micro_batch)


def micro_batches(rows: torch.Tensor, *, micro_batch: int, count: int) -> list[torch.Tensor]:
    """`count` micro-batches of at most `micro_batch` rows; those past the end are empty (0 rows)."""
    parts = list(rows.split(micro_batch)) if len(rows) else []
    return parts + [rows[:0]] * (count - len(parts))


class EpochOrder:
    """Stream position → train row, through per-epoch permutations seeded by (seed, epoch)."""

    def __init__(self, n_rows: int, seed: int, key: tuple[int, ...] = (TRAIN_STREAM,)):
        """`key`: the seed stream of the epochs' permutations (a mixture's source has one of its own)."""
        if n_rows == 0:
            raise ConfigError("the dataset's train split has no rows; prepare more data or lower --seq-len")
        self.n_rows, self.seed, self.key = n_rows, seed, key

    @lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> Permutation:
        return Permutation(self.n_rows, [self.seed, *self.key, epoch])

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Train row indices at stream positions [start, stop), crossing epoch boundaries as needed."""
        positions = np.arange(start, stop, dtype=np.int64)
        epochs = positions // self.n_rows
        out = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))(positions[mask] % self.n_rows)
        return out


class StepLoader:
    """Micro-batches of one rank for a given step, read `read_ahead` steps ahead on background threads.

    `batches(step)` returns `plan.grad_accum` int64 tensors of shape (≤ micro_batch, seq_len + 1); the last ones
    may be empty. Reads of the next steps start as soon as a step is handed out, so reading from S3 overlaps
    compute; each step's rows are fetched with several requests in flight (see `Split.rows`).
    """

    def __init__(self, split: Split, *, plan: BatchPlan, rank: int, seed: int, read_ahead: int = 2,
                 pin_memory: bool = False, order=None):
        self.split, self.plan, self.rank, self.read_ahead = split, plan, rank, read_ahead
        self.pin_memory = pin_memory
        """Page-lock each step's rows (on the reading thread): a copy to a GPU from pageable memory is synchronous,
        from pinned memory it runs beside the compute (`.to(device, non_blocking=True)`)."""
        self.order = order or EpochOrder(len(split), seed)
        """Stream position → train row: one permutation of all rows per epoch, or a mixture of the dataset's
        sources (trainer/mixture.py), whose positions are read a step at a time."""
        self._pool = ThreadPoolExecutor(max_workers=max(1, read_ahead), thread_name_prefix="raylm-prefetch")
        self._ahead: deque[tuple[int, Future]] = deque()
        self.wait_seconds = 0.0
        """Time the caller spent blocked on data since the last `take_wait()`."""

    def rank_rows(self, step: int) -> np.ndarray:
        start, stop = self.plan.share(self.rank)
        return self.order.rows(step * self.plan.global_batch + start, step * self.plan.global_batch + stop)

    def _read(self, step: int) -> list[torch.Tensor]:
        rows = torch.from_numpy(self.split.rows(self.rank_rows(step)).astype(np.int64))
        if self.pin_memory:
            rows = rows.pin_memory()
        return micro_batches(rows, micro_batch=self.plan.micro_batch, count=self.plan.grad_accum)

    def batches(self, step: int) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        while self._ahead and self._ahead[0][0] < step:
            self._ahead.popleft()[1].cancel()
        if self._ahead and self._ahead[0][0] == step:
            result = self._ahead.popleft()[1].result()
        else:  # the first step, or a jump: nothing read ahead is of use
            for _, future in self._ahead:
                future.cancel()
            self._ahead.clear()
            result = self._read(step)
        self.wait_seconds += time.perf_counter() - t0
        next_step = self._ahead[-1][0] + 1 if self._ahead else step + 1
        while len(self._ahead) < self.read_ahead:
            self._ahead.append((next_step, self._pool.submit(self._read, next_step)))
            next_step += 1
        return result

    def take_wait(self) -> float:
        wait, self.wait_seconds = self.wait_seconds, 0.0
        return wait

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def val_rows(n_rows: int, *, rows: int, seed: int, key: tuple[int, ...] = ()) -> np.ndarray:
    """The validation slice: `rows` row indices drawn without replacement from the whole val split by a seeded
    permutation (so every source is represented, not the alphabetically first), sorted for read locality."""
    count = min(rows, n_rows)
    return np.sort(Permutation(n_rows, [seed, VAL_STREAM, *key])(np.arange(count))) if count else np.zeros(0, np.int64)


def rows_per_source(sources: np.ndarray, *, rows: int, seed: int) -> np.ndarray:
    """`rows` seeded rows of each source (all of a source's rows when rows is 0 or it has fewer), sorted: a small
    source is measured on as many rows as a big one."""
    picked = []
    for source in np.unique(sources):
        mine = np.flatnonzero(sources == source)
        picked.append(mine[val_rows(len(mine), rows=rows or len(mine), seed=seed, key=(int(source),))])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def rank_micro_batches(chosen: np.ndarray, *, micro_batch: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's micro-batches of the rows `chosen`. They are cut into micro-batches once, the same on any W, and
    rank r takes micro-batches r, r + W, …: a row is scored in the same batch on any world size. Every rank gets as
    many micro-batches (the last may be empty), as FSDP's collective forwards require."""
    batches = [chosen[i:i + micro_batch] for i in range(0, len(chosen), micro_batch)]
    mine = batches[rank::world]
    return mine + [np.zeros(0, np.int64)] * (-(-len(batches) // world) - len(mine))
