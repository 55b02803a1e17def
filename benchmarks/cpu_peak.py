"""The CPU peak that MFU divides by, run after run: its spread measured once per run vs kept per machine.

    python -m benchmarks.cpu_peak [--runs 5] [--threads N]

Starts `--runs` fresh processes one after another (as runs of one job would), each measuring the fp32 matmul peak
once (`measure_matmul_flops`: what each run used to divide by) and then taking `best_peak` of that measurement against
a cache that starts empty (what a run divides by now). Prints each run's two figures and the spread of each
((max − min) / max); an MFU moves by the same factor as its peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, torch
from trainer.metrics import best_peak, measure_matmul_flops
torch.set_num_threads({threads})
measured = measure_matmul_flops()
print(json.dumps([measured, best_peak(measured)]))
"""


def spread(values: list[float]) -> str:
    return f"{min(values) / 1e9:.0f}-{max(values) / 1e9:.0f} GFLOP/s, spread {100 * (1 - min(values) / max(values)):.0f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    once, kept = [], []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "RAYLM_CACHE_DIR": cache}
        for run in range(args.runs):
            out = subprocess.run([sys.executable, "-c", CHILD.format(threads=args.threads)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            measured, peak = json.loads(out.splitlines()[-1])
            once.append(measured)
            kept.append(peak)
            print(f"run {run + 1}: measured once {measured / 1e9:6.1f} GFLOP/s   best kept {peak / 1e9:6.1f} GFLOP/s",
                  flush=True)
    print(f"{args.threads} threads, {args.runs} runs: measured once per run {spread(once)}; "
          f"best kept per machine {spread(kept)} (after the first run: {spread(kept[1:] or kept)})")


if __name__ == "__main__":
    main()
