"""python -m trainer: pretrain on a dataset from `python -m dataprep`, under Ray Train (default) or without Ray.

    python -m trainer --config configs/tiny.toml --data.path DATASET --run.dir RUN_DIR [--section.field=value ...]
    torchrun --nproc_per_node=8 -m trainer --no-ray --config ...      # the same loop without Ray
"""

from __future__ import annotations

import os
import sys

from dataprep import open_dataset
from dataprep.errors import configure_logging, run_cli
from trainer.cli import parse_job_args
from trainer.data import BatchPlan
from trainer.job import JobConfig, make_paths_absolute

FLAGS = {"--no-ray": "run the loop in this process (or under torchrun) instead of Ray Train"}


def check_before_launch(job: JobConfig, *, worlds: range) -> None:
    """Catch user mistakes on the driver, before workers start: dataset present, batch divisible by any world size
    the run may have (an elastic run's too)."""
    open_dataset(job.data.path)
    for world in worlds:
        BatchPlan(global_batch=job.train.global_batch, micro_batch=job.train.micro_batch, world=world)


def main(argv: list[str]) -> int:
    job, flags = parse_job_args(argv, prog="python -m trainer", description=__doc__, flags=FLAGS)
    configure_logging("trainer")
    make_paths_absolute(job)
    if "--no-ray" in flags:
        from trainer.train import run

        world = int(os.environ.get("WORLD_SIZE", 1))
        check_before_launch(job, worlds=range(world, world + 1))
        summary = run(job)
        if os.environ.get("RANK", "0") == "0":
            print_summary(job, summary)
    else:
        from trainer.ray_launch import launch

        check_before_launch(job, worlds=range(job.ray.min_workers or job.ray.num_workers, job.ray.num_workers + 1))
        print_summary(job, launch(job).return_value)
    return 0


def print_summary(job: JobConfig, summary: dict) -> None:
    evals = [m for m in summary["history"] if "val_loss" in m]
    if evals:
        curve = " -> ".join(f"{m['val_loss']:.3f} (step {m['step']})" for m in evals)
        print(f"validation loss: {curve}")
    if summary["sample"] is not None:
        print(f"sample:\n{summary['sample']}")
    print(f"finished; config, metrics.jsonl and TensorBoard events (tb/) in {job.run.dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
