"""The train loader's costs, measured in one run: the memory of a per-epoch permutation of 10^9 rows and of a
mixture of sources that large, the bytes fetched per byte used when random rows are read from S3, and the rows/s
gained by keeping reads in flight.

    python -m benchmarks.loader [--perm-rows 1000000 1000000000] [--mix-rows 1000 1000000 1000000000]
                                [--positions 1000000] [--chunk 512]
                                [--shards 8] [--shard-rows 2000] [--seq-len 2048] [--global-batch 64] [--steps 8]

1. `EpochOrder(n, seed)` maps --positions stream positions in calls of --chunk positions (one step's rows), once
   under tracemalloc (peak of traced memory, numpy buffers included) and once without it (peak RSS growth, via
   /proc/self/clear_refs, and positions/s). Each call's returned indices are dropped before the next; the peak
   holds one call's output (chunk x 8 B) and that call's temporaries, both O(chunk), plus the permutation's O(1)
   state. An untraced first call imports what numpy loads lazily (numpy.ma, ~1.9 MB, once per process). Target:
   peak minus one call's output < 1 MB at n = 10^9, and the same peak whatever n.
2. A mixture of three sources (trainer/mixture.py's MixtureOrder, --mix-rows rows each) maps the same positions a
   step (--chunk rows) at a time, measured as in 1 with its construction inside the traced pass (one period's
   apportionment table). Target: the same per-step cost and memory from 10^3 to 10^9 rows per source.
3. moto S3, served from this process on 127.0.0.1: --shards shards of --shard-rows rows of seq_len + 1 uint16
   tokens, written by dataprep's ShardWriter in record batches of `rows_per_batch` rows. --steps steps of
   --global-batch rows in `EpochOrder` order are read through a fresh `Split` with 16 reads in flight and another
   with 1; bytes fetched / bytes used = `Split.bytes_read` / (rows x row bytes), shard footers included.
   Target: <= 1.5.
4. The same rows read again by both Splits, shards now open, alternated --repeats times, fastest kept: rows/s with
   16 reads in flight vs 1 at a time. moto shares this process's cores (and GIL) with the reader, and serves a
   ranged GET by reading the whole object (moto.s3.models.FakeKey.value), so a read costs O(shard) server work here.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from benchmarks.moto_s3 import start_moto
from raylm.dataset import Split, rows_per_batch
from raylm.shard_writer import ShardWriter
from trainer.data import EpochOrder
from trainer.mixture import MixtureOrder, Source

BUCKET, SEED, VOCAB = "raylm-bench", 0, 32_000
MB = 1e6


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"/proc/self/status has no {field}")


def map_positions(order, positions: int, chunk: int) -> int:
    """Map stream positions [0, positions) in calls of `chunk`, keeping no call's output; returns a checksum."""
    total = 0
    for start in range(0, positions, chunk):
        total += int(order.rows(start, min(start + chunk, positions)).sum())
    return total


def order_memory(make_order, positions: int, chunk: int) -> dict:
    """Traced peak (tracemalloc) and, in a second pass without tracing, peak RSS growth and positions/s of the
    order `make_order()` builds (inside the traced pass: its state counts)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    traced_sum = map_positions(make_order(), positions, chunk)  # built, and its permutations on first use, traced
    traced = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()

    rss_before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    t0 = time.perf_counter()
    plain_sum = map_positions(make_order(), positions, chunk)
    seconds = time.perf_counter() - t0
    rss_growth = (_status_kb("VmHWM") - rss_before) * 1024
    if plain_sum != traced_sum:
        raise ValueError(f"the two passes disagree: checksums {traced_sum} vs {plain_sum}")
    return {"traced": traced, "output": min(chunk, positions) * 8, "rss": rss_growth, "rate": positions / seconds}


def print_permutation(args) -> None:
    print(f"1. per-epoch permutation (EpochOrder): {args.positions:,} positions mapped in calls of {args.chunk} "
          f"(one step's rows), each call's output dropped before the next")
    print(f"   {'rows n':>15s} {'traced peak':>12s} {'1 output':>9s} {'peak-output':>12s} {'peak RSS +':>11s} "
          f"{'positions/s':>12s}")
    map_positions(EpochOrder(1000, SEED), 2 * args.chunk, args.chunk)  # imports numpy's lazy modules, untraced
    for n in args.perm_rows:
        r = order_memory(lambda: EpochOrder(n, SEED), args.positions, args.chunk)  # noqa: B023 - called at once
        print(f"   {n:15,d} {r['traced'] / 1024:9.1f} KB {r['output'] / 1024:6.1f} KB "
              f"{(r['traced'] - r['output']) / 1024:9.1f} KB {r['rss'] / 2**20:8.2f} MB {r['rate'] / 1e6:10.2f} M")
    n = max(args.perm_rows)
    size = n * np.dtype(np.int64).itemsize
    print(f"   a materialised int64 permutation of {n:,} rows would take {size / 1e9:.2f} GB (computed, not allocated)")
    print("   target: peak-output < 1 MB at 10^9 rows, and no growth with n")


MIX = {"web": 0.5, "code": 0.3, "math": 0.2}


def mixture(n_rows: int, batch: int) -> MixtureOrder:
    """Three sources of `n_rows` rows each (one range apiece) at MIX's weights."""
    sources = [Source(name, ((i * n_rows, (i + 1) * n_rows),)) for i, name in enumerate(MIX)]
    return MixtureOrder(sources, [(0, np.array(list(MIX.values())))], batch=batch, seed=SEED)


def print_mixture(args) -> None:
    print(f"\n2. a mixture of 3 sources ({', '.join(f'{k} {v:g}' for k, v in MIX.items())}; trainer/mixture.py): "
          f"{args.positions:,} positions mapped a step of {args.chunk} at a time")
    print(f"   {'rows/source':>15s} {'traced peak':>12s} {'1 output':>9s} {'peak-output':>12s} {'peak RSS +':>11s} "
          f"{'positions/s':>12s} {'ms/step':>8s}")
    for n in args.mix_rows:
        r = order_memory(lambda: mixture(n, args.chunk), args.positions, args.chunk)  # noqa: B023 - called at once
        print(f"   {n:15,d} {r['traced'] / 1024:9.1f} KB {r['output'] / 1024:6.1f} KB "
              f"{(r['traced'] - r['output']) / 1024:9.1f} KB {r['rss'] / 2**20:8.2f} MB {r['rate'] / 1e6:10.2f} M "
              f"{args.chunk / r['rate'] * 1e3:8.3f}")
    print("   target: the same per-step cost and memory from 10^3 to 10^9 rows per source")


def write_shards(directory: str, *, shards: int, shard_rows: int, row_len: int) -> dict:
    """A split's manifest entry for `shards` shards of random tokens, written as dataprep writes them (full record
    batches, the shard's last one short). Each row's first two tokens are its global index, to check reads by."""
    dtype, rng = np.dtype(np.uint16), np.random.default_rng(SEED)
    per_batch = rows_per_batch(row_len, dtype)
    entry = {"shards": []}
    for s in range(shards):
        writer = ShardWriter(directory, f"train-{s:03d}.arrow", dtype, row_len)
        for first in range(0, shard_rows, per_batch):
            rows = rng.integers(0, VOCAB, (min(per_batch, shard_rows - first), row_len), dtype=dtype)
            index = s * shard_rows + first + np.arange(len(rows))
            rows[:, 0], rows[:, 1] = index & 0xFFFF, index >> 16
            writer.write(rows)
        entry["shards"].append(writer.close())
    return entry


def read_steps(split: Split, steps: list[np.ndarray]) -> tuple[float, float]:
    """(wall, process CPU) seconds to read each step's rows as `StepLoader` does, one `Split.rows` call per step,
    checked against the index written into each row. The CPU is the whole process's: reader and moto server."""
    t0, c0 = time.perf_counter(), time.process_time()
    for rows in steps:
        got = split.rows(rows).astype(np.int64)
        if not np.array_equal(got[:, 0] | (got[:, 1] << 16), rows):
            raise ValueError(f"{split.paths[0]}...: rows read are not the rows asked for")
    return time.perf_counter() - t0, time.process_time() - c0


def print_bytes(splits: dict[int, Split], steps: list[np.ndarray], shards: int) -> None:
    """Part 2: each fresh Split reads the steps' rows; what it fetched beyond the rows is its shard opens."""
    rows = sum(len(r) for r in steps)
    used = rows * next(iter(splits.values())).row_bytes
    print(f"3. bytes fetched / bytes used: {len(steps)} steps x {len(steps[0])} random rows (EpochOrder order), "
          f"{used / MB:.2f} MB of rows, each through a fresh Split (shard footers included)")
    print(f"   {'reads in flight':>16s} {'fetched':>10s} {'fetched/used':>13s} {'opening reads':>24s} "
          f"{'rows/s incl. opens':>19s}")
    for inflight, split in splits.items():
        wall, _ = read_steps(split, steps)
        extra = split.bytes_read - used
        print(f"   {inflight:16d} {split.bytes_read / MB:7.2f} MB {split.bytes_read / used:13.3f} "
              f"{extra / 1024:8.0f} KB ({extra / 1024 / shards:5.1f} KB/shard) {rows / wall:19,.0f}")
    print("   target: fetched/used <= 1.5")


def print_speed(splits: dict[int, Split], steps: list[np.ndarray], repeats: int) -> None:
    """Part 3: the same rows again on the now-open shards, modes alternated, fastest of `repeats` kept."""
    rows = sum(len(r) for r in steps)
    used = rows * next(iter(splits.values())).row_bytes
    best, fetched = {}, {}
    for _ in range(repeats):
        for inflight, split in splits.items():
            before = split.bytes_read
            wall, cpu = read_steps(split, steps)
            fetched[inflight] = split.bytes_read - before
            best[inflight] = min(best.get(inflight, (float("inf"), 0.0)), (wall, cpu))
    print(f"4. rows/s: the same {rows} rows in {len(steps)} Split.rows calls, shards open, fastest of {repeats}")
    print(f"   {'reads in flight':>16s} {'seconds':>8s} {'rows/s':>8s} {'MB/s':>6s} {'process CPU':>12s} "
          f"{'fetched/used':>13s}")
    for inflight, (wall, cpu) in best.items():
        print(f"   {inflight:16d} {wall:8.3f} {rows / wall:8,.0f} {used / wall / MB:6.2f} {cpu:10.2f} s "
              f"{fetched[inflight] / used:13.3f}")
    print(f"   16 in flight / 1 at a time: {best[1][0] / best[16][0]:.2f}x the rows/s")
    print("   (moto serves a ranged GET by reading the whole object under a per-object lock, in this process: a "
          "row costs a shard's worth of server work here, not a round trip as on S3)")


def run_s3(args) -> None:
    row_len = args.seq_len + 1
    directory = f"s3://{BUCKET}/loader"
    t0 = time.perf_counter()
    entry = write_shards(directory, shards=args.shards, shard_rows=args.shard_rows, row_len=row_len)
    written = sum(s["bytes"] for s in entry["shards"])
    per_batch = rows_per_batch(row_len, np.dtype(np.uint16))
    print(f"\nmoto S3 on 127.0.0.1: {args.shards} shards x {args.shard_rows:,} rows of {row_len} uint16 "
          f"({per_batch} rows per record batch, {written / args.shards / MB:.1f} MB per shard), written in "
          f"{time.perf_counter() - t0:.1f}s")
    order = EpochOrder(args.shards * args.shard_rows, SEED)
    steps = [order.rows(s * args.global_batch, (s + 1) * args.global_batch) for s in range(args.steps)]
    splits = {inflight: Split(directory, entry, rows_per_batch=per_batch, row_len=row_len, dtype="uint16",
                              max_inflight=inflight) for inflight in (16, 1)}
    print_bytes(splits, steps, args.shards)
    print_speed(splits, steps, args.repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--perm-rows", type=int, nargs="+", default=[10**6, 10**9], help="epoch sizes n to compare")
    ap.add_argument("--mix-rows", type=int, nargs="+", default=[10**3, 10**6, 10**9],
                    help="rows per source of the mixture compared")
    ap.add_argument("--positions", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=512, help="positions per EpochOrder.rows call")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-rows", type=int, default=2000)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.global_batch * args.steps > args.shards * args.shard_rows:
        raise ValueError(f"{args.steps} steps x {args.global_batch} rows exceed the {args.shards * args.shard_rows} "
                         "rows written: an epoch would repeat rows; write more or read fewer")
    print_permutation(args)
    print_mixture(args)
    server = start_moto(BUCKET)
    try:
        run_s3(args)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
