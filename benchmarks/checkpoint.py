"""Checkpoint cost, side by side in one run: loop time blocked by an async save vs a synchronous save of the same
state, on local disk and on S3, and the time a resumed run takes to its first step (from either).

    python -m benchmarks.checkpoint            # needs the test extra (moto) for the S3 endpoint

The ~30M-parameter model of benchmarks.train_overhead (model + AdamW state ≈ 380 MB per checkpoint) trains in one
process (`--no-ray`) for 15 steps with a save every 5. The S3 endpoint is moto on 127.0.0.1, served from this
process while the trainer runs in its own. Target: async blocked time per mid-run save ≤ 10 % of the synchronous
save's; the wait for the final save at the end of the run is printed apart.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from benchmarks.moto_s3 import start_moto
from benchmarks.train_overhead import DATASET, MODEL, prepare_dataset
from raylm import storage
from trainer.metrics import read_metrics

STEPS, EVERY = 15, 5


def train(run_dir: str, *args: str) -> float:
    """Wall seconds of one `python -m trainer --no-ray` run of the benchmark model."""
    cmd = [sys.executable, "-m", "trainer", "--no-ray", "--data.path", DATASET, "--run.dir", run_dir,
           "--train.global_batch=8", "--train.micro_batch=4", "--train.eval_every=0", "--train.eval_rows=0",
           "--train.sample_prompt=", f"--train.log_every={EVERY}", f"--checkpoint.every={EVERY}",
           *[f"--model.{k}={v}" for k, v in MODEL.items()], *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def blocked(run_dir: str) -> dict:
    """Loop seconds blocked per save (staging, waits for a previous save: commit and prune included), every wait of
    the run counted except the end-of-run wait for the last save's write, which is shown apart (a run must finish
    it; a synchronous run has none, its last save is blocked time like the others)."""
    lines = read_metrics(run_dir)
    total = sum(m.get("checkpoint_blocked_s", 0.0) for m in lines)
    final = lines[-1].get("checkpoint_final_wait_s", 0.0)
    saves = STEPS // EVERY
    return {"per_save": (total - final) / (saves - 1 if final else saves), "final": final}


def main() -> None:
    prepare_dataset()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_moto("raylm-bench")
        roots = {"local disk": tmp, "S3 (moto)": "s3://raylm-bench"}
        rows = {}
        for name, root in roots.items():
            runs = {mode: storage.join(root, mode) for mode in ("async", "sync")}
            for mode, run_dir in runs.items():
                train(run_dir, f"--train.steps={STEPS}", f"--checkpoint.async_save={mode == 'async'}")
            rows[name] = {mode: blocked(run_dir) for mode, run_dir in runs.items()}
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(tmp, "async",
                   "checkpoints", f"step-{STEPS:06d}")) for f in files)
        fresh = train(os.path.join(tmp, "fresh"), "--train.steps=1", "--checkpoint.every=0")
        resumed = train(os.path.join(tmp, "async"), f"--train.steps={STEPS + 1}")
        resumed_s3 = train(storage.join(roots["S3 (moto)"], "async"), f"--train.steps={STEPS + 1}")
        server.stop()
    print(f"checkpoint: {size / 1e6:.0f} MB (model + AdamW), a save every {EVERY} of {STEPS} steps, 1 process; "
          "blocked = every second the loop waited on checkpointing (commit and prune included)")
    print(f"{'loop blocked per save':30s} {'async':>9s} {'sync':>9s} {'async/sync':>11s} {'end-of-run wait':>16s}")
    for name, r in rows.items():
        a, s = r["async"]["per_save"], r["sync"]["per_save"]
        print(f"{name:30s} {a:8.3f}s {s:8.3f}s {100 * a / s:10.1f}% {r['async']['final']:15.3f}s")
    print("target: async <= 10 % of sync (the end-of-run wait is the last save's write, which a run must finish)")
    print(f"process start to first step done: fresh {fresh:.1f}s, resumed from a local checkpoint {resumed:.1f}s "
          f"(+{resumed - fresh:.1f}s to load), from S3 (moto) {resumed_s3:.1f}s (+{resumed_s3 - fresh:.1f}s)")


if __name__ == "__main__":
    main()
