"""One line of benchmarks/gpu.sh: a run's tokens/s, MFU and peak memory from its metrics.jsonl.

    python -m benchmarks.gpu_report RUN_DIR --preset 1b --launcher torchrun

Means over the log windows after the first (the first holds torch.compile and warm-up), leaving out any window that
held a checkpoint save (gpu.sh saves only at the end, in a one-step window of its own). Peak memory is the largest
the kept windows report (CUDA: max allocated on the device; CPU: the process's peak RSS).
"""

from __future__ import annotations

import argparse
import statistics
import sys


def steady_windows(rows: list[dict]) -> list[dict]:
    windows = [m for m in rows if "tokens_per_s" in m][1:]
    return [m for m in windows if not m.get("checkpoint_blocked_s")]


def report_line(rows: list[dict], *, preset: str, launcher: str) -> str:
    kept = steady_windows(rows)
    if not kept:
        raise ValueError(f"{preset} {launcher}: no log window after the first without a checkpoint save "
                         f"({len(rows)} metrics lines); raise --train.steps")
    tokens = statistics.mean(m["tokens_per_s"] for m in kept)
    mfu = statistics.mean(m["mfu"] for m in kept)
    peak = max(m["peak_mem_gib"] for m in kept)
    return f"{preset:<5} {launcher:<10} tokens/s {tokens:>9,.0f}  MFU {100 * mfu:5.1f}%  peak {peak:5.1f} GiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--preset", required=True)
    ap.add_argument("--launcher", required=True)
    args = ap.parse_args()
    from trainer.metrics import read_metrics

    rows = read_metrics(args.run_dir)
    try:
        print(report_line(rows, preset=args.preset, launcher=args.launcher))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
