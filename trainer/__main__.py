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
from trainer.job import JobConfig

FLAGS = {"--no-ray": "run the loop in this process (or under torchrun) instead of Ray Train"}


def check_before_launch(job: JobConfig, *, world: int) -> None:
    """Catch user mistakes on the driver, before workers start: dataset present, batch divisible by workers."""
    open_dataset(job.data.path)
    BatchPlan(global_batch=job.train.global_batch, micro_batch=job.train.micro_batch, world=world)


def main(argv: list[str]) -> int:
    job, flags = parse_job_args(argv, prog="python -m trainer", description=__doc__, flags=FLAGS)
    configure_logging("trainer")
    if "--no-ray" in flags:
        from trainer.train import run

        check_before_launch(job, world=int(os.environ.get("WORLD_SIZE", 1)))
        run(job)
    else:
        from trainer.ray_launch import launch

        check_before_launch(job, world=job.ray.num_workers)
        result = launch(job)
        print(f"run {job.run.name}: finished; metrics in {job.run.dir}/metrics.jsonl, Ray state in {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
