"""The data order contract: step s of any run, on any world size, sees the same global batch.

Epoch e is a permutation of all train rows seeded by (seed, e); the stream of epochs is cut into global batches of
B rows, so step s takes stream positions [s·B, (s+1)·B). Rank r of W takes the r-th contiguous B/W of them and
splits them into micro-batches (grad accumulation = B / (W · micro)). There is no iterator state to save: the step
is the cursor, and a run resumed at step s on any W continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from dataprep.dataset import Split
from raylm.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch of sequences is split across ranks and micro-batches."""

    global_batch: int
    micro_batch: int
    world: int

    def __post_init__(self):
        per_rank, rest = divmod(self.global_batch, self.world)
        if rest or per_rank % self.micro_batch:
            raise ConfigError(
                f"train.global_batch={self.global_batch} must be a multiple of world size {self.world} × "
                f"train.micro_batch={self.micro_batch}; change one of them"
            )

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world

    @property
    def grad_accum(self) -> int:
        return self.per_rank // self.micro_batch


class EpochOrder:
    """Stream position → train row, through per-epoch permutations seeded by (seed, epoch)."""

    def __init__(self, n_rows: int, seed: int):
        if n_rows == 0:
            raise ConfigError("the dataset's train split has no rows; prepare more data or lower --seq-len")
        self.n_rows, self.seed = n_rows, seed

    @lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Train row indices at stream positions [start, stop), crossing epoch boundaries as needed."""
        positions = np.arange(start, stop)
        out = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(positions // self.n_rows):
            mask = positions // self.n_rows == epoch
            out[mask] = self._permutation(int(epoch))[positions[mask] % self.n_rows]
        return out


class StepLoader:
    """Micro-batches of one rank for a given step, read one step ahead on a background thread.

    `batches(step)` returns `grad_accum` int64 tensors of shape (micro_batch, seq_len + 1). The prefetch of step+1
    starts as soon as step is handed out, so reading from S3 overlaps the step's compute.
    """

    def __init__(self, split: Split, *, plan: BatchPlan, rank: int, seed: int):
        self.split, self.plan, self.rank = split, plan, rank
        self.order = EpochOrder(len(split), seed)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylm-prefetch")
        self._next: tuple[int, Future] | None = None
        self.wait_seconds = 0.0
        """Time the caller spent blocked on data since the last `take_wait()`."""

    def rank_rows(self, step: int) -> np.ndarray:
        start = step * self.plan.global_batch + self.rank * self.plan.per_rank
        return self.order.rows(start, start + self.plan.per_rank)

    def _read(self, step: int) -> list[torch.Tensor]:
        rows = torch.from_numpy(self.split.rows(self.rank_rows(step)).astype(np.int64))
        return list(rows.split(self.plan.micro_batch))

    def batches(self, step: int) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        if self._next is not None and self._next[0] == step:
            result = self._next[1].result()
        else:
            result = self._read(step)
        self.wait_seconds += time.perf_counter() - t0
        self._next = (step + 1, self._pool.submit(self._read, step + 1))
        return result

    def take_wait(self) -> float:
        wait, self.wait_seconds = self.wait_seconds, 0.0
        return wait

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def val_batches(split: Split, *, rows: int, micro_batch: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's share of the fixed validation slice (the first `rows` rows of val/), in micro-batches.

    Ranks take equal contiguous parts (the slice is cut to a multiple of `world`), so every rank runs the same
    number of forward passes, which FSDP's collectives require.
    """
    per_rank = min(rows, len(split)) // world
    if per_rank == 0:
        return []
    data = torch.from_numpy(split.rows(np.arange(rank * per_rank, (rank + 1) * per_rank)).astype(np.int64))
    return list(data.split(micro_batch))
