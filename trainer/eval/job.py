"""The job `python -m trainer.eval` runs: its config, and what every rank does (load the checkpoint sharded,
score the held-out datasets and tasks). Ray Train (trainer.ray_launch.launch_eval), torchrun and a single process
run this same code."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from raylm import storage
from raylm.errors import ConfigError, DataError
from raylm.paths import InPath, OutPath
from raylm.storage import StorageConfig
from trainer.distributed import decided_on_rank0, init_distributed, shard_on_meta
from trainer.eval.suite import EvalConfig, eval_paths, open_evaluation
from trainer.job import WorkerGroupConfig
from trainer.model.config import ModelConfig
from trainer.parallelize import ParallelConfig


@dataclass(kw_only=True)
class EvalRunConfig:
    checkpoint: InPath = ""
    """The model: a run directory (its newest committed checkpoint), a step-NNNNNN directory or a Hugging Face
    folder (local or s3://)."""
    out: OutPath = ""
    """Also write the results as JSON here (local or s3://; '' = print only)."""
    micro_batch: int = 8
    """Most rows (or choices) per forward on one worker; its logits (micro_batch × seq_len × vocab) must fit beside
    the model's shard: lower it for long rows and large vocabularies."""
    mixed_precision: str = "fp32"
    """'bf16' (the GPU setting) or 'fp32'."""
    device: str = "auto"
    """'auto' (cuda if available), 'cuda' or 'cpu'."""
    max_seq_len: int = 0
    """Score at up to this context although the checkpoint's is shorter (its rotary table extended as the model
    computes it, no rescaling): how a model does past the length it was trained at. 0 = the checkpoint's."""

    def __post_init__(self):
        if self.max_seq_len < 0:
            raise ConfigError(f"run.max_seq_len must be >= 0, got {self.max_seq_len}")
        if self.micro_batch < 1:
            raise ConfigError(f"run.micro_batch must be >= 1, got {self.micro_batch}")
        ParallelConfig(mixed_precision=self.mixed_precision)  # the same check as training's


@dataclass(kw_only=True)
class EvalJob:
    run: EvalRunConfig = field(default_factory=EvalRunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: WorkerGroupConfig = field(default_factory=WorkerGroupConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


@dataclass
class Checkpoint:
    """A model to evaluate: its config, where its weights are and its tokenizer's files."""

    cfg: ModelConfig
    path: str
    hf: bool
    tokenizer: dict[str, bytes]


def find_checkpoint(path: str, *, max_seq_len: int = 0) -> Checkpoint:
    """The checkpoint at `path`: a raylm run or step directory, or a Hugging Face folder (config.json); with its
    context raised to `max_seq_len` when that is longer (a field that changes no weight)."""
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
    if max_seq_len > found.cfg.max_seq_len:
        found.cfg = dataclasses.replace(found.cfg, max_seq_len=max_seq_len)
    return found


def load_sharded(found: Checkpoint, d, parallel: ParallelConfig) -> nn.Module:
    """The model sharded over the ranks, each rank reading only its shards of the weights."""
    from trainer import checkpoint

    model = shard_on_meta(found.cfg, d, parallel)
    model.to_empty(device=d.device)
    if found.hf:
        from trainer.hf import load_hf_weights

        load_hf_weights(model, found.path)
    else:
        checkpoint.load(found.path, model, None)
    model.init_buffers()
    return model.eval()


def evaluate(job: EvalJob, tasks: list | None = None) -> dict:
    """Every rank: load, score, and return {"checkpoint", "datasets", "tasks"}. `tasks`: [eval]'s tasks as the
    driver's check tokenized them (`trainer.eval.multiple_choice.Task`), else tokenized here."""
    from raylm.tokenizer import load_tokenizer

    d = init_distributed(job.run.device)
    # rank 0's finding on every rank: a live run may commit a newer step between two ranks' looks, and ranks
    # loading different steps into one sharded model would score neither
    found = decided_on_rank0(lambda: find_checkpoint(job.run.checkpoint, max_seq_len=job.run.max_seq_len),
                             rank=d.rank)
    model = load_sharded(found, d, ParallelConfig(mixed_precision=job.run.mixed_precision))
    evaluation = open_evaluation(job.eval, tokenizer=load_tokenizer(found.tokenizer, where=job.run.checkpoint),
                                 max_len=found.cfg.max_seq_len, micro_batch=job.run.micro_batch, rank=d.rank,
                                 world=d.world, tasks=tasks)
    return {"checkpoint": found.path, "workers": d.world, **evaluation.run(model, d.device)}


def job_paths(job: EvalJob) -> dict[str, str]:
    return {"--checkpoint": job.run.checkpoint, "--out": job.run.out, **eval_paths(job.eval)}


