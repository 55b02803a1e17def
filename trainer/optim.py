"""AdamW with decoupled weight decay, and the learning-rate schedules (warmup → cosine, warmup → stable → decay)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from raylm.errors import ConfigError
from trainer.model.config import is_hidden

SCHEDULES = ("cosine", "wsd", "constant")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 100
    """Linear warmup from 0 to the peak."""
    schedule: str = "cosine"
    """After warmup: cosine to min_lr ('cosine'), constant then linear decay ('wsd'), or 'constant'."""
    decay_fraction: float = 0.2
    """wsd only: share of the steps spent in the final linear decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices; norms and embeddings get none unless decay_norms_and_embeddings."""
    decay_norms_and_embeddings: bool = False
    """Also apply weight decay to norm gains and embeddings."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""

    def __post_init__(self):
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"optim.{name} must be > 0, got {getattr(self, name)}")
        for name in ("min_lr_ratio", "decay_fraction", "beta1", "beta2"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"optim.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or "embed" in name


def build_optimizer(model: nn.Module, *, optim: OptimConfig, width_mult: float) -> torch.optim.AdamW:
    """AdamW over parameter groups built by parameter name (so they are the same under FSDP2, compile and after a
    resume): decayed matrices and (unless configured) undecayed norms/embeddings; under μP (width_mult m != 1) the
    hidden matrices form a last group of their own at lr / m, with weight decay × m: torch's AdamW shrinks by
    lr · weight_decay per step, which then stays the same at every width (as microsoft/mup's MuAdamW does). The
    fused kernel (CUDA and CPU, DTensor shards included) reads `optimizer.found_inf` and skips a non-finite step on
    the device, with no host sync."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = {n for n, p in params if optim.decay_norms_and_embeddings or not _no_decay(n, p)}
    hidden = {n for n in decayed if width_mult != 1 and is_hidden(n)}
    groups = [{"params": [p for n, p in params if n in decayed - hidden], "weight_decay": optim.weight_decay},
              {"params": [p for n, p in params if n not in decayed], "weight_decay": 0.0},
              {"params": [p for n, p in params if n in hidden], "weight_decay": optim.weight_decay * width_mult,
               "lr": optim.lr / width_mult}]  # last: the first group's lr is the one logged, η
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=(optim.beta1, optim.beta2),
                             eps=optim.eps, fused=True)


def lr_factor(step: int, *, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak LR for the update made at `step` (0-based), a function of the share of the run done
    once that update is made, (step + 1) / total_steps, in warmup and decay alike (as torchtitan counts): the first
    update is not wasted at lr 0, the last one is made at the floor, and two runs of different lengths whose warmups
    are the same share of their steps (a Tune study's trials) have the same lr at the same share of their tokens."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    floor = optim.min_lr_ratio
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "wsd":
        decay_start = total_steps - int(optim.decay_fraction * total_steps)
        if step < max(decay_start, optim.warmup_steps):
            return 1.0
        progress = (step - decay_start + 1) / max(1, total_steps - decay_start)
        return 1.0 - (1.0 - floor) * min(1.0, progress)
    progress = (step + 1 - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, *, optim: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, optim=optim, total_steps=total_steps)
    )


def set_schedule_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put the schedule at `step` from this run's config (a resume): the learning rate is a function of the step
    and the --optim.* values, so a changed value takes effect from the resumed step."""
    scheduler.last_epoch = step
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def changed_optim(saved: dict | None, current: OptimConfig) -> dict[str, tuple]:
    """{field: (checkpoint's value, this run's)} of the --optim.* values that differ from a checkpoint's."""
    now = dataclasses.asdict(current)
    return {k: (v, now[k]) for k, v in (saved or {}).items() if k in now and now[k] != v}
