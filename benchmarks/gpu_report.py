"""One line of benchmarks/gpu.sh: a run's tokens/s, MFU and peak memory from its metrics.jsonl.

    python -m benchmarks.gpu_report --measure-peak cpu|cuda        # the peak every line of one gpu.sh run divides by
    python -m benchmarks.gpu_report RUN_DIR --preset 1b --launcher torchrun [--peak-flops F]

Means over the log windows after the first (the first holds torch.compile and warm-up), leaving out any window that
held a checkpoint save (gpu.sh saves only at the end, in a one-step window of its own). Peak memory is the largest
the kept windows report (CUDA: max allocated on the device; CPU: the process's peak RSS).

MFU: with --peak-flops, tokens/s × the run's FLOPs per token ÷ (workers × F), F measured once per gpu.sh run and the
same for every line, so the same tokens/s give the same MFU on every side (torchrun and Ray Train). On CPU a run's
own MFU divides by the matmul peak of its worker's threads: a Ray Train worker has 1 thread where torchrun's one
process has every core (unless OMP_NUM_THREADS says otherwise), which with the peak's run-to-run noise made the
smoke print 10.8 % and 20.1 % for the same tokens/s. F is the device's: the datasheet figure of the GPU (as the
trainer's), or the CPU's fp32 matmul peak with the threads a process gets here (`cpu_peak_flops`: every core unless
OMP_NUM_THREADS says otherwise). Without it, the run's own MFU.
"""

from __future__ import annotations

import argparse
import statistics
import sys


def steady_windows(rows: list[dict]) -> list[dict]:
    windows = [m for m in rows if "tokens_per_s" in m][1:]
    return [m for m in windows if not m.get("checkpoint_blocked_s")]


def report_line(rows: list[dict], *, preset: str, launcher: str, flops_per_token: float | None = None,
                peak_flops: float | None = None) -> str:
    """The run's line; MFU against `peak_flops` per worker when given (with the run's `flops_per_token`)."""
    kept = steady_windows(rows)
    if not kept:
        raise ValueError(f"{preset} {launcher}: no log window after the first without a checkpoint save "
                         f"({len(rows)} metrics lines); raise --train.steps")
    tokens = statistics.mean(m["tokens_per_s"] for m in kept)
    if peak_flops:
        mfu = statistics.mean(m["tokens_per_s"] * flops_per_token / (m["workers"] * peak_flops) for m in kept)
    else:
        mfu = statistics.mean(m["mfu"] for m in kept)
    peak = max(m["peak_mem_gib"] for m in kept)
    return f"{preset:<5} {launcher:<10} tokens/s {tokens:>9,.0f}  MFU {100 * mfu:5.1f}%  peak {peak:5.1f} GiB"


def run_flops_per_token(run_dir: str) -> float:
    """Training FLOPs per token of the run's model at its dataset's sequence length (what the trainer's MFU uses),
    from the resolved config.toml the run wrote."""
    from raylm import storage
    from raylm.config import load_config
    from raylm.dataset import open_datasets
    from trainer.job import JobConfig

    job = load_config(JobConfig, storage.join(run_dir, "config.toml"), [])
    return job.model.flops_per_token(open_datasets(job.data.path).seq_len)


def measure_peak(device: str) -> float:
    """The device's peak FLOP/s: a GPU's datasheet figure, or the CPU's matmul peak with this process's threads."""
    import torch

    from trainer.metrics import cpu_peak_flops, device_peak_flops

    return device_peak_flops(torch.device(device)) if device == "cuda" else cpu_peak_flops()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--preset")
    ap.add_argument("--launcher")
    ap.add_argument("--peak-flops", type=float, help="peak FLOP/s per worker that MFU divides by (default: the run's)")
    ap.add_argument("--measure-peak", choices=("cpu", "cuda"), help="print the device's peak FLOP/s and exit")
    args = ap.parse_args()
    if args.measure_peak:
        print(f"{measure_peak(args.measure_peak):.6g}")
        return 0
    if not (args.run_dir and args.preset and args.launcher):
        ap.error("RUN_DIR, --preset and --launcher are required (or --measure-peak)")
    from trainer.metrics import read_metrics

    rows = read_metrics(args.run_dir)
    flops = run_flops_per_token(args.run_dir) if args.peak_flops else None
    try:
        print(report_line(rows, preset=args.preset, launcher=args.launcher, flops_per_token=flops,
                          peak_flops=args.peak_flops))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
