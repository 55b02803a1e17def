"""The root config of a training job: one section per component, loaded from TOML, overridden as --section.field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from raylm import storage
from raylm.errors import ConfigError
from raylm.lease import SETTLE_S
from raylm.paths import InPath, OutPath, option_paths
from raylm.storage import StorageConfig
from trainer.checkpoint import CheckpointConfig
from trainer.dpo import DPOConfig
from trainer.eval.suite import EvalConfig, eval_paths, make_eval_paths_absolute
from trainer.faults import FaultConfig
from trainer.model.config import ModelConfig
from trainer.optim import OptimConfig
from trainer.parallelize import ParallelConfig


@dataclass(kw_only=True)
class DataConfig:
    path: list[InPath] = field(default_factory=lambda: ["data/stdlib"])
    """Dataset directory written by `python -m dataprep` (local or s3://), or several (`--data.path A B C`: same
    tokenizer and seq_len) trained on as one, their sources side by side for data.mix."""
    seed: int = 0
    """Seeds the per-epoch permutation of training rows (the data order) and the validation slice."""
    read_ahead: int = 2
    """Steps whose rows are read ahead of the one training, each fetched with several reads in flight."""
    mix: dict[str, float] = field(default_factory=dict)
    """Weights of the dataset's sources (its --input names, `python -m dataprep`): web=0.6,code=0.3,math=0.1, or a
    TOML table; every step holds each source's share of the global batch to within one row. Empty: rows in the
    proportion the dataset has them (one permutation of all rows)."""
    mix_schedule: str | list[dict[str, float]] = ""
    """Weights that change at set steps: "0:web=0.7,code=0.3; 9000:web=0.3,math=0.7" (the annealing phase from step
    9000), or in TOML a list of tables [{step = 0, web = 0.7, code = 0.3}, {step = 9000, …}]. Instead of data.mix."""
    max_epochs: int = 0
    """Passes over any one source a mixed run may make (0: any; the epochs are in the metrics either way). A mix that
    needs more within train.steps is refused before launch."""

    def __post_init__(self):
        if not self.path:
            raise ConfigError("data.path is empty: give the dataset directory (or several) to train on")
        if self.read_ahead < 1:
            raise ConfigError(f"data.read_ahead must be >= 1, got {self.read_ahead}")
        if self.mix and self.mix_schedule:
            raise ConfigError("data.mix and data.mix_schedule both set the weights: give one (a schedule's step 0 is "
                              "the first mix)")
        if self.max_epochs < 0:
            raise ConfigError(f"data.max_epochs must be >= 0 (0 = no limit), got {self.max_epochs}")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 300
    """Optimizer steps to train."""
    global_batch: int = 16
    """Sequences per optimizer step, the same update on any number of workers up to it (shares differ by at most
    one sequence; gradient accumulation adapts)."""
    micro_batch: int = 4
    """Most sequences per forward/backward on one worker."""
    seed: int = 0
    """Seeds the initial weights (the same on any world size)."""
    log_every: int = 10
    """Steps between metric logs (each a host sync)."""
    eval_every: int = 100
    """Steps between evaluations (and at the end; 0 = only at the end): the validation slice, and the held-out
    datasets and tasks of [eval]."""
    eval_rows: int = 32
    """Rows in the validation slice: a seeded random sample of the whole val split (data.seed), the same on any W."""
    sample_prompt: str = "def"
    """Prompt of the sample generated at the end ('' to skip)."""
    sample_tokens: int = 64
    """Tokens generated for the final sample."""
    sample_temperature: float = 0.8
    """Temperature of the final sample (top-50, seeded by train.seed; 0 = greedy)."""
    max_loss: float = 0.0
    """Stop as diverged when the training loss at a log step exceeds this (0 = only on a non-finite norm)."""
    device: str = "auto"
    """'auto' (cuda if available), 'cuda' or 'cpu'."""
    objective: str = "lm"
    """'lm': next-token loss (pretraining, and chat data's replies); 'dpo': preference tuning on preference pairs
    (`python -m dataprep --format preference`), with the [dpo] section's loss."""

    def __post_init__(self):
        for name in ("steps", "global_batch", "micro_batch", "log_every", "sample_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_rows", "sample_temperature", "max_loss"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"train.device must be auto, cuda or cpu, got {self.device!r}")
        if self.objective not in ("lm", "dpo"):
            raise ConfigError(f"train.objective must be lm or dpo, got {self.objective!r}")


@dataclass(kw_only=True)
class RunConfig:
    dir: OutPath = "runs/demo"
    """Run directory (local or s3://): config.toml, metrics.jsonl, tb/, checkpoints/ and Ray Train's run state; the
    Ray run is named after its last path component."""
    lease_s: float = 60.0
    """One job per run directory: the running job renews its lease (RUN_DIR/lease.json) every lease_s / 4; one not
    renewed for lease_s is presumed dead and taken over by the next job."""

    def __post_init__(self):
        if self.lease_s < 4 * SETTLE_S:
            raise ConfigError(f"run.lease_s must be >= {4 * SETTLE_S:g}, got {self.lease_s}")


@dataclass(kw_only=True)
class WorkerGroupConfig:
    """The [ray] section of every job run on a Ray Train worker group (training, `python -m trainer.eval`)."""

    num_workers: int = 1
    """Workers (one process each; one GPU each with use_gpu), the model sharded over them with FSDP2."""
    use_gpu: bool = False
    """Run on GPUs with NCCL (the GPU switch); CPU workers use gloo."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""

    def __post_init__(self):
        if self.num_workers < 1:
            raise ConfigError(f"ray.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"ray.cpus_per_worker must be > 0, got {self.cpus_per_worker}")


@dataclass(kw_only=True)
class RayConfig(WorkerGroupConfig):
    """Training's [ray] section: the worker group, and how it survives failures and changes size."""

    num_workers: int = 2
    min_workers: int = 0
    """Elastic training: start with as few as this many workers and grow to num_workers (0 = a fixed num_workers);
    every count gives the same updates."""
    max_failures: int = 3
    """Restarts of the worker group after a worker or node dies or a preemption notice (-1 = unlimited: spot
    capacity); each resumes from the last committed checkpoint."""
    resize_check_s: float = 60.0
    """Elastic training: how often a run below ray.num_workers looks for room to grow (a grow restarts the worker
    group from the last committed checkpoint)."""
    start_timeout_s: float = 300.0
    """How long the worker group may wait in all for room to start (or restart: a lost node's replacement, an
    autoscaler's new node) before the run stops with one line naming what is missing and what holds it."""

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.min_workers <= self.num_workers:
            raise ConfigError(f"ray.min_workers must be in [0, ray.num_workers={self.num_workers}], got {self.min_workers}")
        if self.max_failures < -1:
            raise ConfigError(f"ray.max_failures must be >= -1, got {self.max_failures}")
        if self.resize_check_s < 0:
            raise ConfigError(f"ray.resize_check_s must be >= 0, got {self.resize_check_s}")
        if self.start_timeout_s <= 0:
            raise ConfigError(f"ray.start_timeout_s must be > 0, got {self.start_timeout_s}")


@dataclass(kw_only=True)
class InitConfig:
    from_hf: InPath = ""
    """A Hugging Face Llama/Mixtral folder (local or s3://, safetensors) whose weights start the run at step 0 with a
    fresh optimizer. The model's architecture comes from its config.json: the [model] section's architecture fields
    are ignored (fields config.json does not set are kept). A run directory with a committed checkpoint of its own
    resumes from that instead."""
    weights_required: bool = False
    """Set by a preset that fine-tunes trained weights (configs/sft-*.toml): a run must say where they come from
    (--init.from_hf or --checkpoint.resume_from), or pass --init.random=true; it never falls back to random weights
    unasked."""
    random: bool = False
    """Start from random weights although the preset sets init.weights_required (a from-scratch baseline)."""


@dataclass(kw_only=True)
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    init: InitConfig = field(default_factory=InitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    MULTI_VALUE: ClassVar[tuple[str, ...]] = ("data.path",)
    """Options that take several values on the command line (`--data.path A B C`; raylm.cli.parse_job_args)."""

    def __post_init__(self):
        if self.init.from_hf and self.checkpoint.resume_from:
            raise ConfigError(f"--init.from_hf={self.init.from_hf} and --checkpoint.resume_from="
                              f"{self.checkpoint.resume_from} both say where the weights come from; pass only one")
        if self.init.from_hf and self.model.mup_base_dim:
            raise ConfigError(f"--init.from_hf={self.init.from_hf} starts from a standard-parametrisation model; drop "
                              f"--model.mup_base_dim={self.model.mup_base_dim} (μP is for models trained from scratch)")
        check_kernel(self, self.train.device)
        check_weights_source(self)


def check_weights_source(job: JobConfig) -> None:
    """A preset that fine-tunes (init.weights_required) names its weights or opts out with init.random, and
    init.random names none: checked with the rest of the config, so a refused run has started nothing."""
    source = ("--init.from_hf", job.init.from_hf) if job.init.from_hf else \
        ("--checkpoint.resume_from", job.checkpoint.resume_from)
    if job.init.random and source[1]:
        raise ConfigError(f"--init.random=true starts from random weights but {source[0]}={source[1]} names trained "
                          "ones; pass only one")
    if job.init.weights_required and not source[1] and not job.init.random:
        raise ConfigError("this preset fine-tunes trained weights (init.weights_required = true) but none were "
                          "given: pass --checkpoint.resume_from=RUN_DIR --checkpoint.load_weights_only=true or "
                          "--init.from_hf=HF_FOLDER, or --init.random=true to train from random weights")


def check_kernel(job: JobConfig, device: str) -> None:
    """FlexAttention trains on GPUs only: refused on the driver for --train.device=cpu, on workers that got no GPU."""
    if job.model.attention == "flex" and device == "cpu":
        raise ConfigError("model.attention=flex needs GPUs (FlexAttention has no backward on CPU); use "
                          "--model.attention=auto (flex on GPUs, sdpa on CPU), or --ray.use_gpu=true")


def paths(job: JobConfig) -> dict[str, str]:
    """The job's storage locations by option, for the checks that name the one at fault."""
    return {**option_paths("--data.path", job.data.path), "--run.dir": job.run.dir,
            "--dpo.reference": job.dpo.reference,
            "--checkpoint.resume_from": job.checkpoint.resume_from, "--init.from_hf": job.init.from_hf,
            **eval_paths(job.eval)}


def make_paths_absolute(job: JobConfig) -> None:
    """Local paths resolved against the launching directory: Ray workers run elsewhere."""
    job.data.path = [storage.absolute(path) for path in job.data.path]
    job.run.dir = storage.absolute(job.run.dir)
    if job.checkpoint.resume_from:
        job.checkpoint.resume_from = storage.absolute(job.checkpoint.resume_from)
    if job.init.from_hf:
        job.init.from_hf = storage.absolute(job.init.from_hf)
    if job.dpo.reference:
        job.dpo.reference = storage.absolute(job.dpo.reference)
    make_eval_paths_absolute(job.eval)
