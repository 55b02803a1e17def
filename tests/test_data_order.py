"""The data order contract: the global batch of a step is the same on any world size; epochs wrap seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylm.dataset import Split
from raylm.errors import ConfigError
from raylm.permutation import Permutation
from raylm.shard_writer import ShardWriter
from trainer.data import (BatchPlan, EpochOrder, StepLoader, micro_batches, rank_micro_batches, rows_per_source,
                          val_rows)


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
    return Split(str(tmp_path), entry, rows_per_batch=7, row_len=9, dtype="uint16")


def global_batch(split, step, world, micro, batch=12, seed=3) -> torch.Tensor:
    plan = BatchPlan(global_batch=batch, micro_batch=micro, world=world)
    loaders = [StepLoader(split, plan=plan, rank=r, seed=seed) for r in range(world)]
    parts = [l.batches(step) for l in loaders]
    assert len({len(p) for p in parts}) == 1, "every rank must run the same number of micro-batches"
    assert all(len(b) <= micro for p in parts for b in p)
    out = torch.cat([torch.cat(p) for p in parts])
    for l in loaders:
        l.close()
    return out


def test_same_global_batch_on_any_world_size(split):
    for step in (0, 1, 5, 11):
        one = global_batch(split, step, world=1, micro=3)
        assert one.shape == (12, 9) and one.dtype == torch.int64
        for world, micro in ((2, 2), (4, 3), (5, 2), (7, 1), (12, 4)):  # 5 and 7 do not divide 12
            assert torch.equal(one, global_batch(split, step, world=world, micro=micro))


def test_shares_differ_by_at_most_one_row_and_short_ranks_pad_with_empty_micro_batches():
    plan = BatchPlan(global_batch=16, micro_batch=4, world=3)
    assert [plan.share(r) for r in range(3)] == [(0, 6), (6, 11), (11, 16)] and plan.grad_accum == 2
    rows = torch.arange(5 * 3).reshape(5, 3)
    assert [len(b) for b in micro_batches(rows, micro_batch=4, count=3)] == [4, 1, 0]


def test_epochs_are_seeded_permutations_that_wrap(split):
    order = EpochOrder(37, seed=3)
    first, second = order.rows(0, 37), order.rows(37, 74)
    assert sorted(first) == list(range(37)) == sorted(second) and not np.array_equal(first, second)
    assert np.array_equal(order.rows(30, 44), np.concatenate([first[30:], second[:7]]))
    assert np.array_equal(EpochOrder(37, seed=3).rows(0, 37), first)
    assert not np.array_equal(EpochOrder(37, seed=4).rows(0, 37), first)
    # step 3 of batch 12 spans the epoch boundary at 37: rows come from both epochs
    assert global_batch(split, 3, world=1, micro=12)[:, 0].tolist() == first[36:].tolist() + second[:11].tolist()


def test_the_permutation_is_a_bijection_in_constant_memory():
    for n in (1, 2, 3, 1000, 4097):
        assert sorted(Permutation(n, [0, 0])(np.arange(n)).tolist()) == list(range(n))
    huge = Permutation(10**12, [5, 0])  # a trillion rows: nothing is materialised
    sample = huge(np.arange(10**5))
    assert len(np.unique(sample)) == 10**5 and sample.max() < 10**12 and sample.max() > 10**11


def test_prefetched_and_direct_reads_agree(split):
    plan = BatchPlan(global_batch=12, micro_batch=6, world=2)
    loader = StepLoader(split, plan=plan, rank=1, seed=0, read_ahead=3)
    sequential = [torch.cat(loader.batches(s)) for s in range(4)]  # steps 1..3 come from the read-ahead
    fresh = StepLoader(split, plan=plan, rank=1, seed=0)
    assert all(torch.equal(sequential[s], torch.cat(fresh.batches(s))) for s in (3, 0, 2))
    assert len(loader.batches(4)) == plan.grad_accum == 1
    loader.close(), fresh.close()


def test_more_workers_than_the_batch_is_refused_with_the_fields():
    with pytest.raises(ConfigError, match="global_batch=4 is smaller than the 5 workers"):
        BatchPlan(global_batch=4, micro_batch=1, world=5)
    BatchPlan(global_batch=12, micro_batch=5, world=7)  # any W <= B is fine


def test_validation_slice_is_spread_over_the_split_and_batched_the_same_on_any_world_size(split):
    whole = val_rows(len(split), rows=12, seed=0)
    assert len(whole) == 12 and whole.tolist() != list(range(12)), "not the first rows of val/"
    assert whole.max() >= 20, "rows from the second shard too"
    alone = {micro: rank_micro_batches(whole, micro_batch=micro, rank=0, world=1) for micro in (1, 2, 3, 4)}
    for world, micro in ((2, 3), (5, 2), (12, 1), (16, 4)):  # 16 > 12: some ranks hold no rows
        parts = [rank_micro_batches(whole, micro_batch=micro, rank=r, world=world) for r in range(world)]
        assert len({len(p) for p in parts}) == 1, "every rank must run the same number of forward passes"
        batches = [b for p in parts for b in p if len(b)]
        assert sorted(map(tuple, batches)) == sorted(map(tuple, alone[micro])), "a row's batch depends on W"
    assert not np.array_equal(whole, val_rows(len(split), rows=12, seed=1))


def test_held_out_rows_are_sampled_per_source():
    sources = np.array([0] * 90 + [1] * 8 + [2] * 30)
    chosen = rows_per_source(sources, rows=10, seed=0)
    assert np.bincount(sources[chosen]).tolist() == [10, 8, 10], "a small source is measured on as many rows"
    assert np.array_equal(chosen, np.sort(chosen)) and len(set(chosen)) == len(chosen)
    assert np.array_equal(rows_per_source(sources, rows=0, seed=0), np.arange(128))
    assert not np.array_equal(chosen, rows_per_source(sources, rows=10, seed=1))


def test_split_reads_rows_with_ranged_reads_and_bounded_open_shards(split, tmp_path):
    rows = np.arange(37 * 9, dtype=np.uint16).reshape(37, 9)
    rows[:, 0] = np.arange(37)
    bounded = Split(str(tmp_path), {"shards": [{"file": "train/shard-00000.arrow", "rows": 20},
                                               {"file": "train/shard-00001.arrow", "rows": 17}]},
                    rows_per_batch=7, row_len=9, dtype="uint16", max_open=1)
    picks = np.random.default_rng(0).integers(0, 37, size=200)
    assert np.array_equal(bounded.rows(picks), rows[picks]) and len(bounded._files.items) == 1
    assert np.array_equal(bounded[36], rows[36])
