"""python -m tune: search the peak learning rate and global batch size (and DPO's β or a source's mix weight) with
Ray Tune over short trainer runs.

    python -m tune --config configs/X.toml --data.path DATASET [--tune.samples N] [--tune.lr 1e-4:3e-2]
                   [--tune.batch 16,32,64] [--tune.budget_tokens T] [--tune.dir DIR] [--tune.resume]
                   [--train.objective=dpo --tune.beta 0.05:5] [--data.mix web=0.7,code=0.3 --tune.mix math=0.05:0.3]
                   [--section.field=value ...]

Trials are compared at equal training tokens and on schedules of the same shape (each warms up over
--tune.warmup_fraction of its steps); ASHA stops the poor ones early; a diverging trial is recorded as "diverged".
A DPO study (--train.objective=dpo) ranks trials by held-out reward accuracy, not by a loss whose scale changes
with β, and scores the reference log-probs once, before its trials, into DIR/reference.
Writes results.csv, results.png and best.toml (a config `python -m trainer --config` accepts). Ctrl-C stops the study
(exit 130) and writes none of them; the same command with --tune.resume continues it.
"""

from __future__ import annotations

import sys

from raylm.cli import configure_logging, parse_job_args, run_cli
from raylm.errors import ConfigError
from trainer.job import make_paths_absolute
from tune.config import TuneJobConfig


def main(argv: list[str]) -> int:
    job, _ = parse_job_args(argv, prog="python -m tune", description=__doc__, root=TuneJobConfig)
    configure_logging("tune")
    make_paths_absolute(job)
    from raylm import storage
    from tune.study import format_table, run_study, study_metric

    job.tune.dir = storage.absolute(job.tune.dir)
    given = {arg.split("=", 1)[0] for arg in argv}
    if {"--optim.warmup_steps", "--tune.warmup_fraction"} <= given:
        raise ConfigError("--optim.warmup_steps and --tune.warmup_fraction both set the trials' warmup: give one")
    rows, best = run_study(job, warmup_steps=job.optim.warmup_steps if "--optim.warmup_steps" in given else None)
    print(format_table(rows, best, job.tune.extras))
    extras = "".join(f", {extra.column} {best[extra.key]:.3g}" for extra in job.tune.extras)
    print(f"best: lr {best['lr']:.3g}{extras}, global batch {best['global_batch']} ({study_metric(job).label} "
          f"{best['final']:.4f}); wrote {job.tune.dir}/results.csv, results.png and best.toml\n"
          f"train with it: python -m trainer --config {job.tune.dir}/best.toml")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
