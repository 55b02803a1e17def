"""python -m trainer.eval: score a checkpoint on held-out datasets (loss, perplexity, bits per byte, per source) and
multiple-choice tasks (accuracy, length-normalised accuracy), under Ray Train (default) or without Ray.

    python -m trainer.eval --checkpoint RUN_OR_STEP --data.path DS [DS ...] [--tasks TASK.jsonl ...] [--out R.json]
        [--eval.passkey=128,256,512 [--eval.passkey_plot=grid.png]]
    torchrun --nproc_per_node=8 -m trainer.eval --no-ray --checkpoint ...      # the same without Ray

The model is sharded with FSDP2 over the workers and each rank reads only its shards of the checkpoint; rows and
choices are scored in the same batches on any number of workers, so the figures are the same on any W. A
checkpoint is a run directory (its newest committed step), a step-NNNNNN directory or a Hugging Face folder; a
dataset must be tokenized with its tokenizer.
"""

from __future__ import annotations

import json

import torch

from raylm import storage
from raylm.cli import configure_logging, expand_short_options, parse_job_args, short_help
from raylm.errors import ConfigError
from trainer.eval.job import EvalJob, evaluate, find_checkpoint, job_paths
from trainer.eval.passkey import grid_table, plot_grid
from trainer.eval.suite import check_evaluation, make_eval_paths_absolute

FLAGS = {"--no-ray": "run in this process (or under torchrun) instead of Ray Train"}
SHORT = {"--checkpoint": "run.checkpoint", "--data.path": "eval.datasets", "--tasks": "eval.tasks",
         "--out": "run.out"}


def check_before_launch(job: EvalJob) -> list:
    """A user mistake (no checkpoint, a foreign dataset, a task that does not parse) as one line, before workers.
    Returns the tasks tokenized (`trainer.eval.multiple_choice.Task`), which the workers score as they are."""
    from raylm.tokenizer import load_tokenizer

    if not job.run.checkpoint:
        raise ConfigError("--checkpoint is required: a run directory, a step-NNNNNN directory or a Hugging Face folder")
    if not (job.eval.datasets or job.eval.tasks or job.eval.passkey):
        raise ConfigError("nothing to evaluate: pass --data.path DATASET [...], --tasks TASK.jsonl [...] and/or "
                          "--eval.passkey=LENGTH,...")
    for path in job_paths(job).values():
        storage.check_bucket(path)
    found = find_checkpoint(job.run.checkpoint, max_seq_len=job.run.max_seq_len)
    job.run.checkpoint = found.path  # the step found now, not a newer one committed while the workers start
    return check_evaluation(job.eval, tokenizer=load_tokenizer(found.tokenizer, where=job.run.checkpoint),
                            max_len=found.cfg.max_seq_len)


def parse_args(argv: list[str]) -> tuple[EvalJob, set[str]]:
    argv, lists = expand_short_options(argv, SHORT, lists=("eval.datasets", "eval.tasks"),
                                       prog="python -m trainer.eval", flags=FLAGS)
    description = f"{__doc__}\nShort options:\n{short_help(SHORT)}"
    job, flags = parse_job_args(argv, prog="python -m trainer.eval", description=description, flags=FLAGS,
                                root=EvalJob, lists=lists)
    job.run.checkpoint = storage.absolute(job.run.checkpoint) if job.run.checkpoint else ""
    job.run.out = storage.absolute(job.run.out) if job.run.out else ""
    make_eval_paths_absolute(job.eval)
    return job, flags


def table(results: dict) -> str:
    """The results as the lines a person reads."""
    lines = [f"{'dataset':24s} {'source':16s} {'tokens':>12s} {'loss':>8s} {'ppl':>10s} {'bits/byte':>9s}"]
    for name, f in results["datasets"].items():
        for source, g in [("(all)", f), *f.get("by_source", {}).items()]:
            lines.append(f"{name:24s} {source:16s} {g['tokens']:12,d} {g['loss']:8.4f} {g['ppl']:10.2f} "
                         f"{g['bpb']:9.4f}")
    for name, f in results["datasets"].items():
        if f.get("loss_by_position"):
            lines.append(f"{name + ' by position':24s} " + "  ".join(f"{bucket} {loss:.4f}" for bucket, loss in
                                                                      f["loss_by_position"].items()))
    if "passkey" in results:
        lines.append("\n" + grid_table(results["passkey"]))
    if results["tasks"]:
        lines.append(f"\n{'task':24s} {'items':>8s} {'acc':>8s} {'acc_norm':>8s}")
        for name, t in results["tasks"].items():
            lines.append(f"{name:24s} {t['items']:8,d} {t['acc']:8.4f} {t['acc_norm']:8.4f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    job, flags = parse_args(argv)
    configure_logging("trainer")
    tasks = check_before_launch(job)
    if "--no-ray" in flags:
        results = evaluate(job, tasks)
        if torch.distributed.get_rank() != 0:
            return 0
    else:
        from trainer.ray_launch import launch_eval

        results = launch_eval(job, tasks)
    if job.run.out:
        storage.write_bytes(job.run.out, json.dumps(results, indent=1).encode())
    if job.eval.passkey_plot and "passkey" in results:
        plot_grid(results["passkey"], job.eval.passkey_plot)
    print(f"{results['checkpoint']} on {results['workers']} worker(s):\n{table(results)}")
    return 0

