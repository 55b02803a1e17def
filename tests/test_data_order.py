"""The data order contract: the global batch of a step is the same on any world size; epochs wrap seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataprep.dataset import Split
from raylm.errors import ConfigError
from dataprep.shards import ShardWriter
from trainer.data import BatchPlan, EpochOrder, StepLoader, val_batches


@pytest.fixture
def split(tmp_path):
    """Two real shards on disk, 7-row record batches: 37 rows whose first token is the row index."""
    rows = np.arange(37 * 9, dtype=np.uint16).reshape(37, 9)
    rows[:, 0] = np.arange(37)
    for name, part in (("train/shard-00000.arrow", rows[:20]), ("train/shard-00001.arrow", rows[20:])):
        writer = ShardWriter(str(tmp_path), name, part.dtype, 9)
        for start in range(0, len(part), 7):
            writer.write(part[start:start + 7])
        writer.close()
    entry = {"shards": [{"file": "train/shard-00000.arrow", "rows": 20}, {"file": "train/shard-00001.arrow", "rows": 17}]}
    return Split(str(tmp_path), entry, rows_per_batch=7)


def global_batch(split, step, world, micro, batch=12, seed=3) -> torch.Tensor:
    plan = BatchPlan(global_batch=batch, micro_batch=micro, world=world)
    loaders = [StepLoader(split, plan=plan, rank=r, seed=seed) for r in range(world)]
    out = torch.cat([torch.cat(l.batches(step)) for l in loaders])
    for l in loaders:
        l.close()
    return out


def test_same_global_batch_on_any_world_size(split):
    for step in (0, 1, 5, 11):
        one = global_batch(split, step, world=1, micro=3)
        assert one.shape == (12, 9) and one.dtype == torch.int64
        assert torch.equal(one, global_batch(split, step, world=2, micro=2))
        assert torch.equal(one, global_batch(split, step, world=4, micro=3))


def test_epochs_are_seeded_permutations_that_wrap(split):
    order = EpochOrder(37, seed=3)
    first, second = order.rows(0, 37), order.rows(37, 74)
    assert sorted(first) == list(range(37)) == sorted(second) and not np.array_equal(first, second)
    assert np.array_equal(order.rows(30, 44), np.concatenate([first[30:], second[:7]]))
    assert np.array_equal(EpochOrder(37, seed=3).rows(0, 37), first)
    assert not np.array_equal(EpochOrder(37, seed=4).rows(0, 37), first)
    # step 3 of batch 12 spans the epoch boundary at 37: rows come from both epochs
    assert global_batch(split, 3, world=1, micro=12)[:, 0].tolist() == first[36:].tolist() + second[:11].tolist()


def test_prefetched_and_direct_reads_agree(split):
    plan = BatchPlan(global_batch=12, micro_batch=6, world=2)
    loader = StepLoader(split, plan=plan, rank=1, seed=0)
    sequential = [torch.cat(loader.batches(s)) for s in range(4)]  # steps 1..3 come from the prefetch
    fresh = StepLoader(split, plan=plan, rank=1, seed=0)
    assert all(torch.equal(sequential[s], torch.cat(fresh.batches(s))) for s in (3, 0, 2))
    assert len(loader.batches(4)) == plan.grad_accum == 1
    loader.close(), fresh.close()


def test_bad_batch_plans_name_the_fields():
    with pytest.raises(ConfigError, match="global_batch=12 must be a multiple of world size 5"):
        BatchPlan(global_batch=12, micro_batch=1, world=5)
    with pytest.raises(ConfigError, match="micro_batch=4"):
        BatchPlan(global_batch=12, micro_batch=4, world=2)


def test_validation_slice_is_fixed_and_split_across_ranks(split):
    whole = torch.cat(val_batches(split, rows=12, micro_batch=4, rank=0, world=1))
    parts = [val_batches(split, rows=12, micro_batch=3, rank=r, world=2) for r in range(2)]
    assert [len(p) for p in parts] == [2, 2], "every rank must run the same number of forward passes"
    assert torch.equal(whole, torch.cat([torch.cat(p) for p in parts])) and whole[:, 0].tolist() == list(range(12))
    thirds = [torch.cat(val_batches(split, rows=10, micro_batch=4, rank=r, world=3)) for r in range(3)]
    assert torch.cat(thirds)[:, 0].tolist() == list(range(9))
