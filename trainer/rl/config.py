"""The root config of an RL run (`python -m trainer.rl`): the [rl] section, and the sections it shares with
training (optim, parallel, checkpoint, run, ray, storage, fault)."""

from __future__ import annotations

from dataclasses import dataclass, field

from raylm import storage
from raylm.errors import ConfigError
from raylm.paths import InPath
from raylm.storage import StorageConfig
from trainer.checkpoint import CheckpointConfig
from trainer.faults import FaultConfig
from trainer.job import RayConfig, RunConfig
from trainer.optim import OptimConfig
from trainer.parallelize import ParallelConfig
from trainer.rl.grpo import ADVANTAGES


@dataclass(kw_only=True)
class RLConfig:
    policy: InPath = ""
    """The starting policy, and the reference the KL term keeps it near: an instruction-tuned raylm run or
    step-NNNNNN directory, or a Hugging Face folder (local or s3://). Its tokenizer renders the prompts."""
    prompts: InPath = ""
    """Prompts .jsonl: {"prompt": text or [messages], "answer": ...} per line; the whole line goes to the reward."""
    eval_prompts: InPath = ""
    """Held-out prompts (same form), answered greedily by the rollout actors before the first step, every
    eval_every steps and at the end: val/accuracy and val/reward_mean. '' to skip."""
    reward: str = "exact_match"
    """exact_match, numeric, or the user's own: module:function or path/to/file.py:function, called as
    fn(reply: str, answer, example: dict) -> float. A reward of 1 or more counts as correct (accuracy)."""
    steps: int = 100
    """Updates (rollout, reward, update, weight sync)."""
    prompts_per_step: int = 8
    """Prompts per step, from a seeded permutation of the prompts file, epoch after epoch."""
    group_size: int = 8
    """Samples per prompt (GRPO's G): each sample's advantage is measured against its group."""
    max_new_tokens: int = 64
    """Longest reply; a reply cut off here keeps its reward."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_p: float = 1.0
    """Nucleus sampling mass of the rollouts."""
    advantage: str = "grpo"
    """'grpo': (R - group mean) / (group std + 1e-6); 'drgrpo': R - group mean (Dr. GRPO: no std normalisation)."""
    clip_eps: float = 0.2
    """PPO's clip range ε of the probability ratio."""
    kl_coef: float = 0.04
    """β of the k3 KL estimate to the reference policy (0: no reference is kept or scored)."""
    epochs: int = 1
    """Optimizer steps over each step's rollouts (GRPO's μ); the first is on-policy (ratio 1)."""
    micro_batch: int = 8
    """Most sequences per forward/backward on one trainer worker."""
    seed: int = 0
    """Seeds the prompt order and every sample: a rollout is a function of (seed, step, prompt, sample)."""
    log_every: int = 1
    """Steps between metric logs."""
    eval_every: int = 10
    """Steps between held-out evaluations (and at the end; 0 = only at the end)."""
    rollout_workers: int = 2
    """Rollout actors, each with a full copy of the policy (and the reference)."""
    rollout_cpus: float = 1.0
    """CPUs per rollout actor (its torch threads: the whole part of it, at least 1)."""
    rollout_gpus: float = 0.0
    """GPUs per rollout actor (1: it generates on a GPU of its own)."""
    rollout_restarts: int = 10
    """Times Ray restarts a rollout actor whose process or node died (its prompts redone, the same seeds)."""
    reward_timeout_s: float = 10.0
    """A reply whose reward takes longer scores 0 (counted in reward_timeouts)."""
    reward_cpus: float = 0.25
    """CPUs per reward task (one task per prompt's group)."""
    device: str = "auto"
    """The trainer workers' device: 'auto' (cuda if available), 'cuda' or 'cpu'."""

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "epochs", "micro_batch",
                     "log_every", "rollout_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("temperature", "clip_eps", "kl_coef", "eval_every", "rollout_gpus", "rollout_restarts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"rl.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rollout_cpus", "reward_timeout_s", "reward_cpus"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"rl.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rl.top_p must be in (0, 1], got {self.top_p}")
        if self.advantage not in ADVANTAGES:
            raise ConfigError(f"rl.advantage must be one of {', '.join(ADVANTAGES)}, got {self.advantage!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"rl.device must be auto, cuda or cpu, got {self.device!r}")

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclass(kw_only=True)
class RLJob:
    rl: RLConfig = field(default_factory=RLConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=0, schedule="constant",
                                                                   weight_decay=0.0))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=10))
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/rl"))
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self):
        if self.rl.samples_per_step < self.ray.num_workers:
            raise ConfigError(f"rl.prompts_per_step × rl.group_size = {self.rl.samples_per_step} samples per step "
                              f"is fewer than the {self.ray.num_workers} trainer workers; raise it or use fewer")


def check_required(job: RLJob) -> None:
    """What a run must name, which the defaults (as --help shows them) cannot."""
    if not job.rl.policy:
        raise ConfigError("rl.policy is not set: RL starts from an instruction-tuned model; pass "
                          "--rl.policy=SFT_RUN_DIR (or a Hugging Face folder)")
    if not job.rl.prompts:
        raise ConfigError("rl.prompts is not set: pass --rl.prompts=PROMPTS.jsonl ({\"prompt\", \"answer\"} per "
                          "line)")


def job_paths(job: RLJob) -> dict[str, str]:
    return {"--rl.policy": job.rl.policy, "--rl.prompts": job.rl.prompts, "--rl.eval_prompts": job.rl.eval_prompts,
            "--run.dir": job.run.dir}


def make_paths_absolute(job: RLJob) -> None:
    """Local paths resolved against the launching directory: Ray workers run elsewhere. A reward file
    (path/to/file.py:function) too."""
    for name in ("policy", "prompts", "eval_prompts"):
        if getattr(job.rl, name):
            setattr(job.rl, name, storage.absolute(getattr(job.rl, name)))
    job.run.dir = storage.absolute(job.run.dir)
    module, _, fn = job.rl.reward.rpartition(":")
    if module.endswith(".py"):
        job.rl.reward = f"{storage.absolute(module)}:{fn}"
