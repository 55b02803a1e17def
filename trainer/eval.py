"""python -m trainer.eval: score a checkpoint on held-out datasets (loss, perplexity, bits per byte, per source) and
multiple-choice tasks (accuracy, length-normalised accuracy), under Ray Train (default) or without Ray.

    python -m trainer.eval --checkpoint RUN_OR_STEP --data.path DS [DS ...] [--tasks TASK.jsonl ...] [--out R.json]
    torchrun --nproc_per_node=8 -m trainer.eval --no-ray --checkpoint ...      # the same without Ray

The model is sharded with FSDP2 over the workers and each rank reads only its shards of the checkpoint; rows and
choices are scored in the same batches on any number of workers, so the figures are the same on any W. A
checkpoint is a run directory (its newest committed step), a step-NNNNNN directory or a Hugging Face folder; a
dataset must be tokenized with its tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from raylm import storage
from raylm.cli import configure_logging, expand_short_options, parse_job_args, run_cli, short_help
from raylm.config import from_dict, to_dict
from raylm.errors import ConfigError, DataError
from raylm.storage import StorageConfig
from trainer.evaluation import EvalConfig, check_evaluation, open_evaluation
from trainer.job import eval_paths, make_eval_paths_absolute
from trainer.model import ModelConfig
from trainer.parallelize import ParallelConfig

FLAGS = {"--no-ray": "run in this process (or under torchrun) instead of Ray Train"}
SHORT = {"--checkpoint": "run.checkpoint", "--data.path": "eval.datasets", "--tasks": "eval.tasks",
         "--out": "run.out"}


@dataclass(kw_only=True)
class EvalRunConfig:
    checkpoint: str = ""
    """The model: a run directory (its newest committed checkpoint), a step-NNNNNN directory or a Hugging Face
    folder (local or s3://)."""
    out: str = ""
    """Also write the results as JSON here (local or s3://; '' = print only)."""
    micro_batch: int = 8
    """Most rows (or choices) per forward on one worker."""
    mixed_precision: str = "fp32"
    """'bf16' (the GPU setting) or 'fp32'."""
    device: str = "auto"
    """'auto' (cuda if available), 'cuda' or 'cpu'."""

    def __post_init__(self):
        if self.micro_batch < 1:
            raise ConfigError(f"run.micro_batch must be >= 1, got {self.micro_batch}")
        ParallelConfig(mixed_precision=self.mixed_precision)  # the same check as training's


@dataclass(kw_only=True)
class WorkersConfig:
    num_workers: int = 1
    """Workers (one process each; one GPU each with use_gpu), the model sharded over them."""
    use_gpu: bool = False
    """Evaluate on GPUs with NCCL (the GPU switch); CPU workers use gloo."""
    cpus_per_worker: float = 1.0

    def __post_init__(self):
        if self.num_workers < 1:
            raise ConfigError(f"ray.num_workers must be >= 1, got {self.num_workers}")


@dataclass(kw_only=True)
class EvalJob:
    run: EvalRunConfig = field(default_factory=EvalRunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: WorkersConfig = field(default_factory=WorkersConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


@dataclass
class Checkpoint:
    """A model to evaluate: its config, where its weights are and its tokenizer's files."""

    cfg: ModelConfig
    path: str
    hf: bool
    tokenizer: dict[str, bytes]


def find_checkpoint(path: str) -> Checkpoint:
    """The checkpoint at `path`: a raylm run or step directory, or a Hugging Face folder (config.json)."""
    from trainer import checkpoint
    from trainer.weights import tokenizer_files_in

    if checkpoint.is_checkpoint_path(path):
        step = checkpoint.resolve(path)
        cfg = ModelConfig(**checkpoint.read_train_state(step)["model"])
        found = Checkpoint(cfg, step, False, tokenizer_files_in(checkpoint.run_dir_of(step)))
    elif storage.exists(storage.join(path, "config.json")):
        from trainer.hf import model_config_from_hf, read_config

        found = Checkpoint(model_config_from_hf(read_config(path), path, rest=ModelConfig()), path, True,
                           tokenizer_files_in(path))
    else:
        raise DataError(f"--checkpoint {path} is neither a raylm run or step directory nor a Hugging Face folder "
                        "(config.json)")
    if found.tokenizer is None:
        raise DataError(f"--checkpoint {path} carries no tokenizer; its datasets cannot be checked against it")
    return found


def load_sharded(found: Checkpoint, d, parallel: ParallelConfig) -> nn.Module:
    """The model sharded over the ranks, each rank reading only its shards of the weights."""
    from trainer import checkpoint
    from trainer.train import shard_on_meta

    model = shard_on_meta(found.cfg, d, parallel)
    model.to_empty(device=d.device)
    if found.hf:
        from trainer.hf_shards import load_hf_weights

        load_hf_weights(model, found.path)
    else:
        checkpoint.load(found.path, model, None)
    model.init_buffers()
    return model.eval()


def evaluate(job: EvalJob) -> dict:
    """Every rank: load, score, and return {"checkpoint", "datasets", "tasks"}."""
    from dataprep.tokenizer import load_tokenizer
    from trainer.train import init_distributed

    d = init_distributed(job.run.device)
    found = find_checkpoint(job.run.checkpoint)
    model = load_sharded(found, d, ParallelConfig(mixed_precision=job.run.mixed_precision))
    evaluation = open_evaluation(job.eval, tokenizer=load_tokenizer(found.tokenizer, where=job.run.checkpoint),
                                 max_len=found.cfg.max_seq_len, micro_batch=job.run.micro_batch, rank=d.rank,
                                 world=d.world)
    return {"checkpoint": found.path, "workers": d.world, **evaluation.run(model, d.device)}


def eval_worker(config: dict) -> dict:
    """Runs on each Ray Train worker; rank 0's return value becomes `Result.return_value`."""
    from raylm.ray_session import check_local_paths
    from trainer.ray_launch import quiet_user_error_tracebacks

    quiet_user_error_tracebacks()
    job = from_dict(EvalJob, config["job"])
    check_local_paths(job_paths(job), shared_fs=job.storage.shared_fs, where=config["driver_node"])
    return evaluate(job)


def launch(job: EvalJob) -> dict:
    """The evaluation under Ray Train on job.ray.num_workers workers; a worker's user error is raised as itself."""
    import ray
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raylm.ray_session import check_local_paths, init_ray
    from trainer.ray_launch import user_error_of

    init_ray()
    check_local_paths(job_paths(job), shared_fs=job.storage.shared_fs)
    resources = {"CPU": job.ray.cpus_per_worker, **({"GPU": 1} if job.ray.use_gpu else {})}
    trainer = TorchTrainer(
        eval_worker,
        train_loop_config={"job": to_dict(job), "driver_node": ray.get_runtime_context().get_node_id()},
        scaling_config=ScalingConfig(num_workers=job.ray.num_workers, use_gpu=job.ray.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"raylm-eval-{ray.get_runtime_context().get_job_id()}",
                             logging_config=LoggingConfig(log_level="WARNING"),
                             worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
        torch_config=TorchConfig(backend="nccl" if job.ray.use_gpu else "gloo"),
    )
    try:
        return trainer.fit().return_value
    except Exception as exc:  # noqa: BLE001 - a worker's user error is re-raised as itself
        user_error = user_error_of(exc)
        if user_error is not None:
            raise user_error from exc
        raise


def job_paths(job: EvalJob) -> dict[str, str]:
    return {"--checkpoint": job.run.checkpoint, "--out": job.run.out, **eval_paths(job.eval)}


def check_before_launch(job: EvalJob) -> None:
    """A user mistake (no checkpoint, a foreign dataset, a task that does not parse) as one line, before workers."""
    from dataprep.tokenizer import load_tokenizer

    if not job.run.checkpoint:
        raise ConfigError("--checkpoint is required: a run directory, a step-NNNNNN directory or a Hugging Face folder")
    if not (job.eval.datasets or job.eval.tasks):
        raise ConfigError("nothing to evaluate: pass --data.path DATASET [...] and/or --tasks TASK.jsonl [...]")
    for path in job_paths(job).values():
        storage.check_bucket(path)
    found = find_checkpoint(job.run.checkpoint)
    check_evaluation(job.eval, tokenizer=load_tokenizer(found.tokenizer, where=job.run.checkpoint),
                     max_len=found.cfg.max_seq_len)


def parse_args(argv: list[str]) -> tuple[EvalJob, set[str]]:
    argv, lists = expand_short_options(argv, SHORT, lists=("eval.datasets", "eval.tasks"), prog="python -m trainer.eval",
                                       flags=FLAGS)
    description = f"{__doc__}\nShort options:\n{short_help(SHORT)}"
    job, flags = parse_job_args(argv, prog="python -m trainer.eval", description=description, flags=FLAGS,
                                root=EvalJob)
    job.eval = dataclasses.replace(job.eval, **{k.split(".")[1]: v for k, v in lists.items() if k.startswith("eval.")})
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
    if results["tasks"]:
        lines.append(f"\n{'task':24s} {'items':>8s} {'acc':>8s} {'acc_norm':>8s}")
        for name, t in results["tasks"].items():
            lines.append(f"{name:24s} {t['items']:8,d} {t['acc']:8.4f} {t['acc_norm']:8.4f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    job, flags = parse_args(argv)
    configure_logging("trainer")
    check_before_launch(job)
    if "--no-ray" in flags:
        results = evaluate(job)
        if torch.distributed.get_rank() != 0:
            return 0
    else:
        results = launch(job)
    if job.run.out:
        storage.write_bytes(job.run.out, json.dumps(results, indent=1).encode())
    print(f"{results['checkpoint']} on {results['workers']} worker(s):\n{table(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
