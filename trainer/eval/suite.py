"""What an evaluation scores, in the training loop (`--eval.*`) and in `python -m trainer.eval`: held-out datasets
(loss, perplexity, bits per byte, per source) and multiple-choice tasks (accuracy, length-normalised accuracy).

Every input is checked on the driver before workers start: each dataset must be tokenized with the model's tokenizer,
in the model's document format (BOS or not), and have val rows that fit the model's context; each task must parse and
fit the context. The tasks the driver tokenized for that check (`python -m trainer.eval`'s, the trainer's, a Tune
study's) are shipped to the workers, which score them as they are: a task file is tokenized once per command.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raylm import storage
from raylm.dataset import dataset_name, open_dataset
from raylm.errors import ConfigError, DataError
from raylm.paths import InPath, OutPath, option_paths
from trainer.eval.heldout import flat_metrics, held_out, loss_sums, report
from trainer.eval.multiple_choice import Task, load_task, score_task, task_name
from trainer.eval.passkey import Passkey, passkey_task, score_passkey
from trainer.weights import same_vocabulary


@dataclass(kw_only=True)
class EvalConfig:
    datasets: list[InPath] = field(default_factory=list)
    """Held-out datasets (local or s3://), each scored on its val split: loss, perplexity and bits per byte, per
    source when the dataset records sources. Make one from held-out text with the model's tokenizer:
    `python -m dataprep --input TEXT --tokenizer RUN_DIR --val-fraction 1 --output DIR`."""
    tasks: list[InPath] = field(default_factory=list)
    """Multiple-choice tasks (local or s3://): .jsonl lines {"query": str, "choices": [str, ...], "gold": int}."""
    rows: int = 256
    """Rows scored of each source of each held-out dataset: a seeded sample of its val split, the same on any W
    (0 = all; in the training loop the rows are then kept in memory)."""
    task_items: int = 0
    """Items scored per task: a seeded sample, the same on any W (0 = all)."""
    seed: int = 0
    """Seeds the samples of rows and items, and the passkeys."""
    passkey: list[int] = field(default_factory=list)
    """Passkey retrieval at these context lengths in tokens (e.g. 128,256,512): a random 5-digit key planted at
    each of passkey_depths in filler text must be the model's greedy continuation of "The pass key is"."""
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Where the key sits: 0 = the start of the text, 1 = just before the question."""
    passkey_trials: int = 10
    """Keys per length and depth."""
    passkey_plot: OutPath = ""
    """python -m trainer.eval: the passkey grid as a heat-map PNG here (local or s3://)."""

    def __post_init__(self):
        if self.passkey_trials < 1:
            raise ConfigError(f"eval.passkey_trials must be >= 1, got {self.passkey_trials}")
        for name in ("rows", "task_items"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        check_unique([dataset_name(p) for p in self.datasets], "eval.datasets")
        check_unique([task_name(p) for p in self.tasks], "eval.tasks")


def eval_paths(cfg: EvalConfig) -> dict[str, str]:
    """`--eval.datasets` (`--eval.datasets[i]` when there are several) and the same for tasks."""
    return {**option_paths("--eval.datasets", cfg.datasets), **option_paths("--eval.tasks", cfg.tasks),
            **({"--eval.passkey_plot": cfg.passkey_plot} if cfg.passkey_plot else {})}


def make_eval_paths_absolute(cfg: EvalConfig) -> None:
    cfg.datasets = [storage.absolute(p) for p in cfg.datasets]
    cfg.tasks = [storage.absolute(p) for p in cfg.tasks]
    cfg.passkey_plot = storage.absolute(cfg.passkey_plot) if cfg.passkey_plot else ""


def check_unique(names: list[str], option: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"{option} has two entries named {name!r} (results are keyed by the last path "
                              "component); give one another directory or file name")
        seen.add(name)


def open_held_out(path: str, *, tokenizer, max_len: int):
    """A held-out dataset the model can score: its tokenizer is the model's (the rule training applies,
    `trainer.weights.same_vocabulary`), its documents start as the model's do
    (`tokenizer.bos_first`), its val rows fit the context."""
    dataset = open_dataset(path)
    if not same_vocabulary(dataset.tokenizer(), tokenizer):
        raise DataError(f"eval dataset {path} was tokenized with another tokenizer than the model's; make it with "
                        "`python -m dataprep --tokenizer RUN_DIR ...` (the run's or training dataset's tokenizer)")
    if dataset.bos != tokenizer.bos_first:
        raise DataError(f"eval dataset {path} was made with --bos {'on' if dataset.bos else 'off'} but the model's "
                        f"documents start {'with BOS' if tokenizer.bos_first else 'without BOS'}; make it again with "
                        f"--bos {'on' if tokenizer.bos_first else 'off'}")
    if len(dataset.val) == 0:
        raise DataError(f"eval dataset {path} has no val rows; make held-out sets with --val-fraction 1")
    if dataset.seq_len > max_len:
        raise DataError(f"eval dataset {path} has rows of {dataset.seq_len} tokens, longer than the model's "
                        f"max_seq_len={max_len}; make it with --seq-len {max_len} or less")
    return dataset


@dataclass
class Evaluation:
    """One rank's held-out sets and tasks, opened once and scored at every call."""

    sets: list = field(default_factory=list)
    tasks: list = field(default_factory=list)
    micro_batch: int = 1
    rank: int = 0
    world: int = 1
    passkey: Passkey | None = None

    def __bool__(self) -> bool:
        return bool(self.sets or self.tasks or self.passkey)

    @torch.no_grad()
    def run(self, model, device: torch.device) -> dict:
        """{"datasets": {name: figures}, "tasks": {name: accuracy}, and "passkey": its grid when asked for};
        collective."""
        datasets = {held.name: report(held, loss_sums(model, held, device)) for held in self.sets}
        tasks = {task.name: score_task(model, task, micro_batch=self.micro_batch, device=device, rank=self.rank,
                                       world=self.world) for task in self.tasks}
        passkey = {"passkey": score_passkey(model, self.passkey, micro_batch=self.micro_batch, device=device,
                                            rank=self.rank, world=self.world)} if self.passkey else {}
        return {"datasets": datasets, "tasks": tasks, **passkey}


def open_evaluation(cfg: EvalConfig, *, tokenizer, max_len: int, micro_batch: int, rank: int = 0,
                    world: int = 1, keep: bool = False, tasks: list[Task] | None = None) -> Evaluation:
    """The configured sets and tasks for this rank (`keep`: hold the held-out rows in memory, for repeated use;
    `tasks`: the tasks as `check_evaluation` tokenized them on the driver, else they are tokenized here)."""
    sets = [held_out(open_held_out(path, tokenizer=tokenizer, max_len=max_len),
                     name=dataset_name(path), token_bytes=tokenizer.token_bytes, rows=cfg.rows, seed=cfg.seed,
                     micro_batch=micro_batch, rank=rank, world=world, per_source=True, keep=keep,
                     by_position=True)
            for path in cfg.datasets]
    if tasks is None:
        tasks = load_tasks(cfg, tokenizer=tokenizer, max_len=max_len)
    return Evaluation(sets, tasks, micro_batch, rank, world, open_passkey(cfg, tokenizer=tokenizer, max_len=max_len))


def open_passkey(cfg: EvalConfig, *, tokenizer, max_len: int) -> Passkey | None:
    return passkey_task(tokenizer, lengths=cfg.passkey, depths=cfg.passkey_depths, trials=cfg.passkey_trials,
                        seed=cfg.seed, max_len=max_len) if cfg.passkey else None


def load_tasks(cfg: EvalConfig, *, tokenizer, max_len: int) -> list[Task]:
    return [load_task(path, tokenizer, max_len=max_len, limit=cfg.task_items, seed=cfg.seed) for path in cfg.tasks]


def check_evaluation(cfg: EvalConfig, *, tokenizer, max_len: int) -> list[Task]:
    """Refuse a missing or foreign dataset, or a task that does not parse, before any worker starts; returns the
    tasks tokenized, to ship to the workers (`open_evaluation(tasks=...)`)."""
    for path in cfg.datasets:
        open_held_out(path, tokenizer=tokenizer, max_len=max_len)
    open_passkey(cfg, tokenizer=tokenizer, max_len=max_len)
    return load_tasks(cfg, tokenizer=tokenizer, max_len=max_len)


def metrics(results: dict) -> dict:
    """Flat metric names for the sinks: eval/{dataset}/loss|ppl|bpb (and /{source}, and loss_at/{positions}),
    task/{task}/acc|acc_norm, passkey/acc and passkey/{length}/{depth}."""
    out = {}
    for name, figures in results["datasets"].items():
        out |= flat_metrics(f"eval/{name}/", figures)
    for name, acc in results["tasks"].items():
        out |= {f"task/{name}/acc": acc["acc"], f"task/{name}/acc_norm": acc["acc_norm"]}
    if "passkey" in results:
        out["passkey/acc"] = results["passkey"]["acc"]
        out |= {f"passkey/{length}/{depth}": acc for length, row in results["passkey"]["grid"].items()
                for depth, acc in row.items()}
    return out
