"""python -m trainer: pretrain on a dataset from `python -m dataprep`, under Ray Train (default) or without Ray.

    python -m trainer --config configs/tiny.toml --data.path DATASET [DATASET ...] --run.dir RUN_DIR
                      [--data.mix web=0.6,code=0.4] [--section.field=value ...]
    torchrun --nproc_per_node=8 -m trainer --no-ray --config ...      # the same loop without Ray
"""

from __future__ import annotations

import os
import sys

from raylm import storage
from raylm.cli import configure_logging, parse_job_args, run_cli
from raylm.dataset import open_datasets
from raylm.errors import ConfigError
from trainer import checkpoint, reference
from trainer.data import check_fits
from trainer.eval.suite import check_evaluation
from trainer.job import JobConfig, make_paths_absolute, paths
from trainer.mixture import check_epochs, mix_spec, mixture_order
from trainer.train import check_checkpoint, resolve_model, starting_checkpoint

FLAGS = {"--no-ray": "run the loop in this process (or under torchrun) instead of Ray Train"}


def check_before_launch(job: JobConfig, *, max_world: int) -> tuple[int, list]:
    """Catch user mistakes on the driver, before workers start: dataset present and big enough for a step, a mix of
    its sources that names them and stays within data.max_epochs, every
    world size the run may have (an elastic run's too) at most the batch, init.from_hf's config.json readable and
    its vocabulary big enough for the dataset's tokenizer, [eval]'s datasets and tasks usable with the model's
    tokenizer and context, and the checkpoint the run starts from (RUN_DIR's newest, else checkpoint.resume_from's)
    of this very model, dataset and data order (for a warm start: of this model, on data of the same tokenizer).
    Returns the step of RUN_DIR's newest checkpoint (0 when it has none) and [eval]'s tasks as tokenized for that
    check, which the ranks score as they are."""
    for path in paths(job).values():
        storage.check_bucket(path)
    dataset = open_datasets(job.data.path)
    check_fits(dataset, global_batch=job.train.global_batch, world=max_world)
    order = mixture_order(job.data, dataset, batch=job.train.global_batch)
    if order is not None:
        check_epochs(order, steps=job.train.steps, max_epochs=job.data.max_epochs)
    resolve_model(job, dataset)
    reference.check_job(job, dataset)
    tasks = check_evaluation(job.eval, tokenizer=dataset.tokenizer(), max_len=job.model.max_seq_len)
    start = starting_checkpoint(job)
    if start is None:
        return 0, tasks
    path, own = start
    identity = checkpoint.run_identity(job.model, dataset, data_seed=job.data.seed, mix=mix_spec(job.data),
                                       global_batch=job.train.global_batch)
    state = check_checkpoint(job, dataset, path, own=own, identity=identity)
    return state["step"] if own else 0, tasks


def how_to_continue(job: JobConfig) -> str:
    newest = checkpoint.latest_committed(job.run.dir, quiet=True)
    if newest is None:
        return "no checkpoint was committed yet: the same command starts the run again"
    return f"run the same command again to continue from {newest}"


def main(argv: list[str], *, reference_only: bool = False) -> int:
    """`python -m trainer`, or with `reference_only` `python -m trainer.reference`: the same job up to its reference
    log-probs (trainer/reference.py), stored and not trained on."""
    prog, doc = ("python -m trainer.reference", reference.__doc__) if reference_only else ("python -m trainer", __doc__)
    job, flags = parse_job_args(argv, prog=prog, description=doc, flags=FLAGS, root=JobConfig)
    configure_logging("trainer")
    if reference_only and not (job.train.objective == "dpo" and job.dpo.needs_reference):
        raise ConfigError("python -m trainer.reference scores the reference of a DPO run: pass "
                          "--train.objective=dpo (and a --dpo.loss other than simpo, which needs none)")
    make_paths_absolute(job)
    no_ray = "--no-ray" in flags
    start, tasks = check_before_launch(job, max_world=int(os.environ.get("WORLD_SIZE", 1)) if no_ray else job.ray.num_workers)
    if start >= job.train.steps and not reference_only:
        if os.environ.get("RANK", "0") == "0":
            print(f"{job.run.dir} already finished: its newest checkpoint is at step {start} and train.steps="
                  f"{job.train.steps}; raise --train.steps to train on, or use a new --run.dir for a new run")
        return 0
    try:
        if no_ray:
            summary = run_here(job, tasks, reference_only=reference_only)
        else:
            from trainer.ray_launch import launch

            summary = launch(job, tasks=tasks, reference_only=reference_only).return_value
    except KeyboardInterrupt:
        raise KeyboardInterrupt(how_to_continue(job)) from None
    if os.environ.get("RANK", "0") == "0":
        if reference_only:
            print(f"reference log-probs of every train and val row in {reference.directory(job)} "
                  f"({summary['reference_rows']:,} rows scored by this pass in {summary['reference_s']:.1f} s)")
        else:
            print_summary(job, summary)
    return 0


def run_here(job: JobConfig, tasks: list, *, reference_only: bool = False) -> dict:
    """The loop in this process, one rank of a torchrun job or alone; rank 0 holds the run directory's lease.
    `tasks`: [eval]'s, as this process tokenized them for its checks."""
    from raylm.lease import held
    from trainer.train import run

    if os.environ.get("RANK", "0") != "0":
        return run(job, tasks=tasks, reference_only=reference_only)
    with held(job.run.dir, job=f"torchrun {os.environ.get('TORCHELASTIC_RUN_ID', 'local')}",
              seconds=job.run.lease_s) as lease:
        return run(job, lease=lease.token, tasks=tasks, reference_only=reference_only)


def print_summary(job: JobConfig, summary: dict) -> None:
    evals = [m for m in summary["history"] if "val_loss" in m]
    if evals:
        curve = " -> ".join(f"{m['val_loss']:.3f} (step {m['step']})" for m in evals)
        print(f"validation loss: {curve}")
    consumed = summary["history"][-1] if summary["history"] else {}
    sources = [key[len("data/"):-len("/tokens")] for key in consumed if key.startswith("data/") and
               key.endswith("/tokens")]  # a source's name may hold a "/" (dataprep's a/web beside b/web)
    if sources:
        print("data: " + ", ".join(f"{name} {consumed[f'data/{name}/tokens']:,} tokens "
                                   f"({consumed[f'data/{name}/epochs']:.2f} epochs)" for name in sources))
    if summary["sample"] is not None:
        print(f"sample:\n{summary['sample']}")
    metrics = "metrics/" if storage.is_s3(job.run.dir) else "metrics.jsonl"
    print(f"finished; config, {metrics} and TensorBoard events (tb/) in {job.run.dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
