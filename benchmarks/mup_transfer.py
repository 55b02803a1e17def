"""μP learning-rate transfer: 5 learning rates × widths {64, 128, 256} × {standard, μP}, each trained on the same
stdlib tokens, side by side in one run.

    python -m benchmarks.mup_transfer [--steps 60] [--lrs 1e-3,3e-3,1e-2,3e-2,1e-1] [--widths 64,128,256]

Every run is raylm's own loop in this process (one rank, no Ray): 2 blocks of heads 16 wide (the width grows by
heads, as raylm's presets do), SwiGLU 4 × width, the same seed, data order and token budget; μP's base width is
the narrowest. The figure is the validation loss at the end, on the same 256 rows of val/. Printed: the loss table,
the best lr per width, and for each parametrisation how far the best lr moves from the narrowest to the widest
model and how much worse the widest model is at the narrowest one's best lr than at its own.
Targets: under μP the best lr at the widest width is the narrowest one's (or one grid step away), and the widest
model's loss at that transferred lr is within 1 % of its best.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import subprocess
import sys
import tempfile
import time

DATASET = "data/bench-stdlib-mup"
HEAD_DIM = 16


def prepare_dataset() -> None:
    """The stdlib corpus at seq 256 with a 5 % val split (a no-op when it is already there with these settings)."""
    subprocess.run([sys.executable, "-m", "dataprep", "--output", DATASET, "--seq-len", "256", "--vocab-size", "8000",
                    "--val-fraction", "0.05"], check=True, capture_output=True)


def final_val_loss(width: int, lr: float, *, mup: bool, base: int, steps: int, run_dir: str) -> float:
    """The validation loss after `steps` steps of 16 sequences of a model of this width, trained at peak lr."""
    from raylm.config import load_config
    from trainer.job import JobConfig
    from trainer.train import run

    job = load_config(JobConfig, None, [
        f"--model.dim={width}", "--model.n_layers=2", f"--model.n_heads={width // HEAD_DIM}",
        f"--model.ffn_hidden={4 * width}", f"--model.mup_base_dim={base if mup else 0}", f"--data.path={DATASET}",
        f"--run.dir={run_dir}", f"--optim.lr={lr}", f"--optim.warmup_steps={max(1, steps // 10)}",
        f"--train.steps={steps}", "--train.global_batch=16", "--train.micro_batch=16", f"--train.log_every={steps}",
        "--train.eval_every=0", "--train.eval_rows=256", "--train.sample_prompt=", "--train.device=cpu"])
    with contextlib.redirect_stdout(io.StringIO()):  # the loop's own metric lines
        history = run(job)["history"]
    loss = history[-1]["val_loss"]
    return loss if math.isfinite(loss) else math.inf


def best_lr(row: dict[float, float]) -> float:
    return min(row, key=row.get)


def report(table: dict, lrs: list[float], widths: list[int]) -> None:
    print(f"{'':10s} {'width':>6s} " + " ".join(f"{lr:>9.0e}" for lr in lrs) + "   best lr")
    for mup in (False, True):
        for width in widths:
            row = table[mup, width]
            cells = " ".join(f"{row[lr]:9.4f}" for lr in lrs)
            print(f"{'muP' if mup else 'standard':10s} {width:6d} {cells}   {best_lr(row):.0e}")
    narrow, wide = widths[0], widths[-1]
    for mup in (False, True):
        moved = lrs.index(best_lr(table[mup, wide])) - lrs.index(best_lr(table[mup, narrow]))
        transferred = table[mup, wide][best_lr(table[mup, narrow])]
        worse = transferred / table[mup, wide][best_lr(table[mup, wide])] - 1
        print(f"{'muP' if mup else 'standard'}: the best lr moves {moved:+d} grid steps from width {narrow} to {wide}; "
              f"width {wide} at width {narrow}'s best lr is {100 * worse:.2f} % above its best loss")
        if mup:
            met = abs(moved) <= 1 and worse <= 0.01
            print("targets (muP: best lr within one grid step, transferred loss within 1 %): "
                  f"{'met' if met else 'MISSED'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2,1e-1")
    p.add_argument("--widths", default="64,128,256")
    args = p.parse_args()
    lrs, widths = [float(x) for x in args.lrs.split(",")], [int(x) for x in args.widths.split(",")]
    prepare_dataset()
    table, started = {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raylm-mup-") as tmp:
        for mup in (False, True):
            for width in widths:
                table[mup, width] = {lr: final_val_loss(width, lr, mup=mup, base=widths[0], steps=args.steps,
                                                        run_dir=f"{tmp}/{int(mup)}-{width}-{lr}") for lr in lrs}
                print(f"# {'muP' if mup else 'standard'} width {width} done ({time.perf_counter() - started:.0f} s)",
                      file=sys.stderr, flush=True)
    print(f"{args.steps} steps × 16 × 256 = {args.steps * 16 * 256:,} tokens per run; validation loss at the end:")
    report(table, lrs, widths)


if __name__ == "__main__":
    main()
