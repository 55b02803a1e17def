"""The [tune] section, and the root config of `python -m tune`: a training job plus the search around it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from raylm.errors import ConfigError
from raylm.paths import OutPath
from trainer.job import JobConfig
from trainer.model.config import ModelConfig

SEARCHES = ("random", "optuna")

MAX_WARMUP_FRACTION = 0.5
"""A trial warming up over more of its tokens than it trains at and after its peak lr would rank warmups, not lrs."""


@dataclass(frozen=True)
class Searched:
    """A value searched beside the lr and batch: its key in a trial's parameters (and its tune.KEY option), its
    column in results.csv and the table, and its LOW:HIGH range or grid."""

    key: str
    column: str
    values: tuple[float, float] | list[float]


@dataclass(kw_only=True)
class TuneConfig:
    samples: int = 6
    """Trials sampled from a LOW:HIGH lr range (a comma-list grid runs each lr × batch point once)."""
    lr: str = "1e-4:3e-2"
    """Peak learning rates: LOW:HIGH samples log-uniformly, a comma list (1e-4,1e-3,1e-2) is a grid."""
    beta: str = ""
    """DPO's β (train.objective = dpo), searched with the lr and in its form: LOW:HIGH samples log-uniformly beside
    an lr range, a comma list is a grid beside an lr grid. Empty: every trial keeps the job's dpo.beta."""
    mix: str = ""
    """One source's data.mix weight, searched with the lr and in its form: NAME=LOW:HIGH or NAME=a,b,c; the other
    sources keep their data.mix weights (weights are relative). Empty: every trial trains on the job's mix."""
    batch: list[int] = field(default_factory=lambda: [16, 32, 64])
    """Global batch sizes (sequences) to choose from."""
    budget_tokens: int = 2_000_000
    """Training tokens per trial: trials are compared at equal tokens, not steps."""
    warmup_fraction: float = 0.1
    """Each trial warms up over this share of its own steps (its optim.warmup_steps = round(fraction × steps)) and
    decays over the rest to its last step (optim.schedule: cosine to min_lr_ratio, or wsd's final decay_fraction):
    trials see the same tokens, so every batch size reaches its peak lr, and every lr, at the same token count. The
    job's optim.warmup_steps (a preset's, or the default) is the full run's: best.toml keeps it and trials do not use
    it. An --optim.warmup_steps N given on the study's command line is the trials' warmup instead: N steps of the
    shortest trial (the largest batch) and the same tokens in every other (fraction = N / its steps), refused when it
    is more than half of that trial."""
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
    dir: OutPath = "runs/tune"
    """Study directory (local or s3://): results.csv, results.png, best.toml, trials/, Ray Tune's state."""
    resume: bool = False
    """Continue an interrupted study in tune.dir (finished trials are not run again)."""
    max_concurrent: int = 0
    """Trials at once (0 = as many as the cluster's CPUs or GPUs hold)."""
    diverge_factor: float = 1.5
    """A trial whose training loss exceeds this × ln(vocabulary) (the loss of a uniform guess) ends as diverged."""
    proxy_dim: int = 0
    """Search on a proxy of this width (same depth, head_dim, data and tokens; fewer heads) and write best.toml for
    the configured width with the proxy's best lr: under μP (--model.mup_base_dim) the best lr transfers across
    width. 0 = search at the configured width."""

    def __post_init__(self):
        lr = self.lr_values  # parses, and raises on a bad value
        if self.mix and not (self.mix_source and "=" in self.mix):
            raise ConfigError(f"tune.mix={self.mix!r} must be NAME=LOW:HIGH or NAME=a,b,c (a data.mix source's weight)")
        for extra in self.extras:
            if isinstance(extra.values, tuple) != isinstance(lr, tuple):
                raise ConfigError(f"tune.{extra.key}={getattr(self, extra.key)} must take tune.lr's form ({self.lr}): "
                                  "both LOW:HIGH ranges, sampled together, or both comma-list grids")
        if not self.batch or min(self.batch) < 1:
            raise ConfigError(f"tune.batch={self.batch} must list at least one global batch size >= 1, e.g. 16,32,64")
        if self.proxy_dim < 0:
            raise ConfigError(f"tune.proxy_dim must be >= 0 (0 = off), got {self.proxy_dim}")
        for name in ("samples", "budget_tokens", "marks", "grace_marks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tune.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_fraction <= MAX_WARMUP_FRACTION:
            raise ConfigError(f"tune.warmup_fraction must be in [0, {MAX_WARMUP_FRACTION}], got {self.warmup_fraction}")
        if self.grace_marks > self.marks:
            raise ConfigError(f"tune.grace_marks={self.grace_marks} must be <= tune.marks={self.marks}")
        if self.reduction_factor < 2 or self.max_concurrent < 0 or self.diverge_factor <= 1:
            raise ConfigError("tune.reduction_factor must be >= 2, tune.max_concurrent >= 0, tune.diverge_factor > 1")
        if self.search not in SEARCHES:
            raise ConfigError(f"tune.search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if self.search == "optuna" and self.grid:
            raise ConfigError("tune.search=optuna samples lr from a LOW:HIGH range, not a grid")

    @property
    def lr_values(self) -> tuple[float, float] | list[float]:
        """(low, high) of a LOW:HIGH lr range, or the values of a comma-list grid."""
        return searched_values("lr", self.lr)

    @property
    def mix_source(self) -> str:
        """The source whose data.mix weight tune.mix searches."""
        return self.mix.partition("=")[0].strip()

    @property
    def extras(self) -> list[Searched]:
        """What the study searches beside lr and batch: DPO's β, a source's mix weight."""
        found = [Searched("beta", "beta", searched_values("beta", self.beta))] if self.beta else []
        if self.mix:
            found.append(Searched("mix", f"{self.mix_source}_weight",
                                  searched_values("mix", self.mix.partition("=")[2])))
        return found

    @property
    def grid(self) -> bool:
        """A grid study (each lr × batch × β point once), not a sampled one."""
        return isinstance(self.lr_values, list)

    def diverged_loss(self, vocab_size: int) -> float:
        return self.diverge_factor * math.log(vocab_size)

    def mark_tokens(self, seq_len: int) -> int:
        """Training tokens between two marks: a whole number of steps of every batch size (a multiple of their
        least common multiple × seq_len), so every trial validates, and meets ASHA, at exactly the same counts."""
        unit = math.lcm(*self.batch) * seq_len
        mark = self.budget_tokens // self.marks // unit * unit
        if mark == 0:
            hint = ", or use batch sizes that divide one another" if unit > max(self.batch) * seq_len else ""
            raise ConfigError(f"tune.budget_tokens={self.budget_tokens} over {self.marks} marks is less than one "
                              f"step of every batch size in tune.batch={','.join(map(str, self.batch))} ({unit:,} tokens: "
                              f"their least common multiple × seq_len {seq_len}); raise it to at least "
                              f"{unit * self.marks:,}{hint}")
        return mark


def searched_values(name: str, text: str) -> tuple[float, float] | list[float]:
    """tune.<name>'s values: (low, high) from LOW:HIGH (sampled log-uniformly), or a list from a comma list (a
    grid), each a number > 0."""
    if ":" not in text:
        values = [_positive(part, name, text) for part in text.split(",") if part.strip()]
        if not values:
            raise ConfigError(f"tune.{name}={text!r} is empty; give LOW:HIGH or a comma list")
        return values
    low, high = (_positive(part, name, text) for part in text.split(":", 1))
    if not low < high:
        raise ConfigError(f"tune.{name}={text} must be LOW:HIGH with LOW < HIGH, e.g. 1e-4:1e-2")
    return low, high


def _positive(text: str, name: str, whole: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"tune.{name}={whole!r}: {text!r} is not a number") from None
    if not value > 0:
        raise ConfigError(f"tune.{name}={whole!r}: every value must be > 0")
    return value


@dataclass(kw_only=True)
class TuneJobConfig(JobConfig):
    tune: TuneConfig = field(default_factory=TuneConfig)

    UNUSED_PATHS: ClassVar[tuple[str, ...]] = ("--run.dir",)
    """Path options a study does not read: each trial's run directory is under tune.dir."""

    def __post_init__(self):
        super().__post_init__()
        if self.tune.beta and self.train.objective != "dpo":
            raise ConfigError(f"tune.beta={self.tune.beta} searches DPO's β: it needs --train.objective=dpo")
        if self.tune.mix and not self.data.mix:
            raise ConfigError(f"tune.mix={self.tune.mix} searches one weight of data.mix: set --data.mix with the "
                              "other sources' weights (e.g. --data.mix web=0.7,code=0.3)")
        if not self.tune.proxy_dim:
            return
        start = ("--init.from_hf", self.init.from_hf) if self.init.from_hf else \
            ("--checkpoint.resume_from", self.checkpoint.resume_from)
        if start[1]:
            raise ConfigError(f"tune.proxy_dim={self.tune.proxy_dim} trains proxies from scratch; "
                              f"{start[0]}={start[1]} starts from weights of the configured width: drop one of them")
        proxy_model(self.model, self.tune.proxy_dim)  # refuses a width the model cannot shrink to


def proxy_model(model: ModelConfig, dim: int) -> ModelConfig:
    """The model at width `dim` for a proxy study: same depth and head_dim, fewer heads (kv heads in the same
    grouping), the SwiGLU hidden size scaled with width. μP's lr transfers across width grown this way."""
    if not model.mup_base_dim:
        raise ConfigError(f"tune.proxy_dim={dim}: a proxy's best lr transfers to the configured width only under μP; "
                          "set --model.mup_base_dim (e.g. to the proxy width)")
    heads, group = dim // model.head_dim, model.n_heads // model.kv_heads
    if dim % model.head_dim or heads % group:
        raise ConfigError(f"tune.proxy_dim={dim} must be a multiple of head_dim × (n_heads / n_kv_heads) = "
                          f"{model.head_dim * group}: the proxy keeps the heads' width and grouping, with fewer heads")
    if dim >= model.dim:
        raise ConfigError(f"tune.proxy_dim={dim} must be narrower than the model's dim={model.dim}")
    return dataclasses.replace(model, dim=dim, n_heads=heads, n_kv_heads=heads // group if model.n_kv_heads else 0,
                               ffn_hidden=round(model.hidden * dim / model.dim))  # every hidden size × the same ratio
