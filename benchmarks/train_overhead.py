"""Training overhead: the same ~30M-parameter model, batch and steps three ways, side by side in one run.

    python -m benchmarks.train_overhead [--steps 25] [--log-every 5]

  1. a plain fp32 PyTorch loop in this process (no FSDP, no Ray, all threads): the CPU MFU reference;
  2. raylm's loop on 2 ranks under `torchrun` (FSDP2 over gloo, one thread per rank);
  3. the same loop under Ray Train with 2 CPU workers (`python -m trainer`).
Each figure drops the first log window (warm-up). Targets: Ray Train step time ≤ 1.05 × torchrun's; data wait
< 1 % of the step; 2-worker FSDP2 MFU ≥ 55 % of the machine's matmul peak.
MFU = tokens/s × FLOPs per token ÷ the machine's fp32 matmul peak (all threads, `cpu_peak_flops`), one peak for the
three rows, so equal tokens/s are equal MFU (each run's own MFU divides by its workers' threads' peak, measured
apart); FLOPs per token = 6·N + 12·L·H·head_dim·T.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from raylm.dataset import open_dataset
from raylm.ray_session import free_port
from trainer.data import BatchPlan, StepLoader
from trainer.loss import lm_loss
from trainer.metrics import cpu_peak_flops, read_metrics
from trainer.model.config import ModelConfig
from trainer.model.transformer import Transformer
from trainer.optim import OptimConfig, build_optimizer

DATASET = "data/bench-stdlib-512"
MODEL = {"dim": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 4, "ffn_hidden": 1408}
GLOBAL_BATCH, MICRO_BATCH = 8, 4


def prepare_dataset() -> None:
    """The stdlib corpus at seq 512 (a no-op when it is already there with these settings)."""
    subprocess.run([sys.executable, "-m", "dataprep", "--output", DATASET, "--seq-len", "512", "--vocab-size", "8000"],
                   check=True, capture_output=True)


def plain_loop(steps: int, skip: int) -> dict:
    """A textbook single-process fp32 loop over the same rows raylm reads: forward, loss, backward, AdamW."""
    ds = open_dataset(DATASET)
    cfg = ModelConfig(**MODEL, vocab_size=ds.vocab_size, max_seq_len=ds.seq_len)
    model = Transformer(cfg)
    model.init_weights(0)
    optimizer = build_optimizer(model, optim=OptimConfig(lr=1e-3), width_mult=1.0)
    loader = StepLoader(ds.train, plan=BatchPlan(global_batch=GLOBAL_BATCH, micro_batch=GLOBAL_BATCH, world=1),
                        rank=0, seed=0)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        (batch,) = loader.batches(step)
        loss_sum, _ = lm_loss(model, batch)
        (loss_sum / batch[:, 1:].numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    loader.close()
    step_time = statistics.mean(times[skip:])
    tokens_per_s = GLOBAL_BATCH * ds.seq_len / step_time
    return {"step_time_s": step_time, "tokens_per_s": tokens_per_s, "params": cfg.num_params(),
            "flops_per_token": cfg.flops_per_token(ds.seq_len)}


def raylm_run(launcher: list[str], run_dir: str, steps: int, log_every: int) -> dict:
    """Mean step time, data-wait share and MFU over the log windows after the first, from metrics.jsonl."""
    args = ["--data.path", DATASET, "--run.dir", run_dir, f"--train.steps={steps}", f"--train.log_every={log_every}",
            "--train.eval_every=0", "--train.eval_rows=0", "--train.sample_prompt=", "--ray.num_workers=2",
            f"--train.global_batch={GLOBAL_BATCH}", f"--train.micro_batch={MICRO_BATCH}",
            *[f"--model.{k}={v}" for k, v in MODEL.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    proc = subprocess.run([*launcher, *args], check=True, capture_output=True, text=True, env=env)
    windows = [m for m in read_metrics(run_dir) if "loss" in m][1:]
    out = {key: statistics.mean(m[key] for m in windows)
           for key in ("step_time_s", "data_wait_share", "tokens_per_s")}
    return out | {"setup": re.search(r"\d+ workers x \d+ micro-batches of <= \d+.*\(\d+ threads\)", proc.stderr)[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--log-every", type=int, default=5)
    args = ap.parse_args()
    prepare_dataset()
    torch.set_num_threads(os.cpu_count())
    peak = cpu_peak_flops()
    plain = plain_loop(args.steps, skip=args.log_every)
    print(f"model {plain['params'] / 1e6:.1f}M params, seq 512, global batch {GLOBAL_BATCH}, {args.steps} steps "
          f"(first {args.log_every} dropped), {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        torchrun = raylm_run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              "--master_port", str(free_port()), "-m", "trainer", "--no-ray"],
                             os.path.join(tmp, "torchrun"), args.steps, args.log_every)
        ray = raylm_run([sys.executable, "-m", "trainer"], os.path.join(tmp, "ray"), args.steps, args.log_every)
    rows = [("plain fp32 loop, 1 process", plain), ("raylm FSDP2, torchrun x2", torchrun),
            ("raylm FSDP2, Ray Train x2", ray)]
    for r in (plain, torchrun, ray):
        r["mfu"] = r["tokens_per_s"] * plain["flops_per_token"] / peak
    print(f"MFU against {peak / 1e9:.0f} GFLOP/s ({os.cpu_count()} threads' fp32 matmul peak) for every row")
    print(f"{'':30s} {'step s':>8s} {'tok/s':>8s} {'MFU':>7s} {'data wait':>10s}")
    for name, r in rows:
        wait = f"{100 * r['data_wait_share']:.2f}%" if "data_wait_share" in r else "-"
        print(f"{name:30s} {r['step_time_s']:8.3f} {r['tokens_per_s']:8.0f} {100 * r['mfu']:6.1f}% {wait:>10s}")
    for name, r in (("torchrun", torchrun), ("Ray Train", ray)):  # the same work on each side, as each rank says
        print(f"{name:10s} rank 0: {r['setup']}")
    ratio = ray["step_time_s"] / torchrun["step_time_s"]
    print(f"Ray Train / torchrun step time: {ratio:.3f}x (target <= 1.05)")
    print(f"data wait under Ray Train: {100 * ray['data_wait_share']:.2f}% of the step (target < 1 %)")
    print(f"MFU: plain loop {100 * plain['mfu']:.1f}%, raylm 2-worker FSDP2 {100 * ray['mfu']:.1f}% (target >= 55 %)")


if __name__ == "__main__":
    main()
