"""The [tune] section, and the root config of `python -m tune`: a training job plus the search around it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from raylm.errors import ConfigError
from trainer.job import JobConfig

SEARCHES = ("random", "optuna")


@dataclass(kw_only=True)
class TuneConfig:
    samples: int = 6
    """Trials sampled from a LOW:HIGH lr range (a comma-list grid runs each lr × batch point once)."""
    lr: str = "1e-4:3e-2"
    """Peak learning rates: LOW:HIGH samples log-uniformly, a comma list (1e-4,1e-3,1e-2) is a grid."""
    batch: list[int] = field(default_factory=lambda: [16, 32, 64])
    """Global batch sizes (sequences) to choose from."""
    budget_tokens: int = 2_000_000
    """Training tokens per trial: trials are compared at equal tokens, not steps."""
    marks: int = 4
    """Validation points per trial, at equal token counts; ASHA compares trials there."""
    grace_marks: int = 1
    """ASHA: marks every trial runs before it may be stopped."""
    reduction_factor: int = 2
    """ASHA: keep the best 1/reduction_factor of trials at each mark."""
    search: str = "random"
    """'random' (seeded) or 'optuna' (TPE; pip install optuna)."""
    seed: int = 0
    """Seeds the sampled configurations."""
    dir: str = "runs/tune"
    """Study directory (local or s3://): results.csv, results.png, best.toml, trials/, Ray Tune's state."""
    resume: bool = False
    """Continue an interrupted study in tune.dir (finished trials are not run again)."""
    max_concurrent: int = 0
    """Trials at once (0 = as many as the cluster's CPUs or GPUs hold)."""
    diverge_factor: float = 1.5
    """A trial whose training loss exceeds this × ln(vocabulary) (the loss of a uniform guess) ends as diverged."""

    def __post_init__(self):
        grid_or_range = self.lr_grid or self.lr_range  # parses, and raises on a bad value
        if not grid_or_range:
            raise ConfigError(f"tune.lr={self.lr!r} is empty; give LOW:HIGH or a comma list")
        if not self.batch or min(self.batch) < 1:
            raise ConfigError(f"tune.batch={self.batch} must list at least one global batch size >= 1, e.g. 16,32,64")
        for name in ("samples", "budget_tokens", "marks", "grace_marks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tune.{name} must be >= 1, got {getattr(self, name)}")
        if self.grace_marks > self.marks:
            raise ConfigError(f"tune.grace_marks={self.grace_marks} must be <= tune.marks={self.marks}")
        if self.reduction_factor < 2 or self.max_concurrent < 0 or self.diverge_factor <= 1:
            raise ConfigError("tune.reduction_factor must be >= 2, tune.max_concurrent >= 0, tune.diverge_factor > 1")
        if self.search not in SEARCHES:
            raise ConfigError(f"tune.search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if self.search == "optuna" and self.lr_grid:
            raise ConfigError("tune.search=optuna samples lr from a LOW:HIGH range, not a grid")

    @property
    def lr_range(self) -> tuple[float, float] | None:
        """(low, high) of a LOW:HIGH lr range, else None."""
        if ":" not in self.lr:
            return None
        low, high = (_positive(part, self.lr) for part in self.lr.split(":", 1))
        if not low < high:
            raise ConfigError(f"tune.lr={self.lr} must be LOW:HIGH with LOW < HIGH, e.g. 1e-4:1e-2")
        return low, high

    @property
    def lr_grid(self) -> list[float] | None:
        """The values of a comma-list lr grid, else None."""
        if ":" in self.lr:
            return None
        return [_positive(part, self.lr) for part in self.lr.split(",") if part.strip()]

    def diverged_loss(self, vocab_size: int) -> float:
        return self.diverge_factor * math.log(vocab_size)


def _positive(text: str, whole: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"tune.lr={whole!r}: {text!r} is not a number") from None
    if not value > 0:
        raise ConfigError(f"tune.lr={whole!r}: learning rates must be > 0")
    return value


@dataclass(kw_only=True)
class TuneJobConfig(JobConfig):
    tune: TuneConfig = field(default_factory=TuneConfig)
