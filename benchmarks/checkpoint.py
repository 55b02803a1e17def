"""Checkpoint cost, side by side in one run: loop time blocked by an async save vs a synchronous save of the same
state, on local disk and on S3, and the time a resumed run takes to its first step.

    python -m benchmarks.checkpoint            # needs the test extra (moto) for the S3 endpoint

The ~30M-parameter model of benchmarks.train_overhead (model + AdamW state ≈ 380 MB per checkpoint) trains in one
process (`--no-ray`) for 15 steps with a save every 5. The S3 endpoint is moto on 127.0.0.1, served from this
process while the trainer runs in its own. Target: async blocked time ≤ 10 % of the synchronous save's.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.train_overhead import DATASET, MODEL, prepare_dataset
from raylm import storage

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


def blocked_per_save(run_dir: str) -> float:
    lines = [json.loads(l) for l in storage.read_bytes(storage.join(run_dir, "metrics.jsonl")).decode().splitlines()]
    return sum(m["checkpoint_blocked_s"] for m in lines) / (STEPS // EVERY)


def start_moto() -> str:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    return "s3://raylm-bench"


def main() -> None:
    prepare_dataset()
    with tempfile.TemporaryDirectory() as tmp:
        roots = {"local disk": tmp, "S3 (moto)": start_moto()}
        rows = {}
        for name, root in roots.items():
            runs = {mode: storage.join(root, mode) for mode in ("async", "sync")}
            for mode, run_dir in runs.items():
                train(run_dir, f"--train.steps={STEPS}", f"--checkpoint.async_save={mode == 'async'}")
            rows[name] = {mode: blocked_per_save(run_dir) for mode, run_dir in runs.items()}
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(tmp, "async",
                   "checkpoints", f"step-{STEPS:06d}")) for f in files)
        fresh = train(os.path.join(tmp, "fresh"), "--train.steps=1", "--checkpoint.every=0")
        resumed = train(os.path.join(tmp, "async"), f"--train.steps={STEPS + 1}")
    print(f"checkpoint: {size / 1e6:.0f} MB (model + AdamW), {STEPS // EVERY} saves in {STEPS} steps, 1 process")
    print(f"{'loop blocked per save':24s} {'async':>9s} {'sync':>9s} {'async/sync':>11s}")
    for name, r in rows.items():
        print(f"{name:24s} {r['async']:8.3f}s {r['sync']:8.3f}s {100 * r['async'] / r['sync']:10.1f}%")
    print("target: async <= 10 % of sync")
    print(f"process start to first step done: fresh {fresh:.1f}s, resumed from a local checkpoint {resumed:.1f}s "
          f"(+{resumed - fresh:.1f}s to load)")


if __name__ == "__main__":
    main()
