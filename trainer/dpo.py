"""Preference tuning: the DPO family of losses on pairs of replies, against reference log-probs computed once.

A preference row (dataprep's `--format preference`) holds whole pairs: pair j of a row is example 2j+1 (the chosen
reply, its prompt rendered before it) and example 2j+2 (the rejected one), with the loss plane on the reply tokens.
At training time the row carries a fourth plane, the reference model's summed log-prob of example e at position e
(float64 bits in the int64 row: `trainer.reference`), so the reference is read with the rows and never held in
memory as a second model.

Each pair's policy log-prob π (summed over its reply tokens) and the reference's ρ give the losses of the papers,
with h the pair's preference margin and ε the label smoothing (cDPO):
    sigmoid (DPO, Rafailov et al. 2023):  h = (π_c - ρ_c) - (π_r - ρ_r),     -(1-ε) log σ(βh) - ε log σ(-βh)
    norm (length-normalised DPO, Tülu 3): h = (π_c - ρ_c)/|c| - (π_r - ρ_r)/|r|, the same
    ipo (Azar et al. 2023):               h as for sigmoid,                 (h - 1/(2β))²
    simpo (Meng et al. 2024, no reference): h = π_c/|c| - π_r/|r|,  -(1-ε) log σ(βh - γ) - ε log σ(γ - βh)
The rewards logged are β times each reply's term of h. The step's loss is the mean over the step's pairs on all
workers (each pair's loss divided by the step's global pair count), plus `sft_weight` times the chosen replies'
token-mean NLL over the step: the same update on any world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raylm.errors import ConfigError
from raylm.paths import OutPath
from trainer.loss import forward_rows, unpack

LOSSES = ("sigmoid", "norm", "ipo", "simpo")
STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
         "logps/rejected", "pairs")
"""Per-step sums over pairs (the last is the pair count that turns them into means)."""


@dataclass(kw_only=True)
class DPOConfig:
    """The [dpo] section, used with train.objective = "dpo"."""

    loss: str = "sigmoid"
    """sigmoid (DPO), norm (length-normalised DPO, Tülu 3's), ipo, or simpo (needs no reference)."""
    beta: float = 0.1
    """Strength of the pull towards the reference (SimPO: the reward scale)."""
    label_smoothing: float = 0.0
    """Assumed share of flipped labels (conservative DPO); sigmoid, norm and simpo."""
    sft_weight: float = 0.0
    """Weight of an added NLL term on the chosen replies (token mean over the step)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin γ."""
    reference: OutPath = ""
    """Where the reference log-probs are kept (local or s3://): computed by the first run that needs them and reused
    by re-runs and Tune trials. Empty: RUN_DIR/reference."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"dpo.loss={self.loss!r} must be one of {', '.join(LOSSES)}")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0:
            raise ConfigError(f"dpo.sft_weight must be >= 0, got {self.sft_weight}")

    @property
    def needs_reference(self) -> bool:
        return self.loss != "simpo"


def example_logps(logits: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob, reply tokens) of every example id of each row, both (B, T+1) float64 indexed by example
    id (0 = padding: nothing), over the targets that carry loss (trainer.loss.unpack). The one computation of a
    reply's log-prob: the reference pass and training both use it."""
    tokens, examples, weights = unpack(rows)
    logp = -F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none").double()
    ids, weights = examples[:, 1:], weights.double()
    sums = torch.zeros(tokens.shape, dtype=torch.float64, device=logits.device)
    counts = torch.zeros_like(sums)
    return sums.scatter_add_(1, ids, logp * weights), counts.scatter_add_(1, ids, weights)


def reference_plane(rows: torch.Tensor) -> torch.Tensor:
    """The reference log-prob of each example id of each row (B, T+1) float64: the fourth plane's bits."""
    return rows[:, 3].contiguous().view(torch.float64)


def pairs_of(per_example: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) values of the pairs present, flat: example ids 2j+1 and 2j+2 of each row."""
    chosen, rejected = per_example[:, 1::2], per_example[:, 2::2]
    n = rejected.shape[1]
    return chosen[:, :n][present], rejected[present]


def pair_losses(cfg: DPOConfig, policy: tuple[torch.Tensor, torch.Tensor], reference: tuple | None,
                lengths: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) of each pair, from summed log-probs (chosen, rejected) of the policy
    and the reference (None for SimPO) and the replies' token counts."""
    (pc, pr), (lc, lr) = policy, lengths
    if cfg.loss == "simpo":
        zc, zr = pc / lc, pr / lr
    else:
        zc, zr = pc - reference[0], pr - reference[1]
        if cfg.loss == "norm":
            zc, zr = zc / lc, zr / lr
    h, eps = zc - zr, cfg.label_smoothing
    if cfg.loss == "ipo":
        losses = (h - 1 / (2 * cfg.beta)) ** 2
    else:
        logits = cfg.beta * h - (cfg.simpo_gamma if cfg.loss == "simpo" else 0.0)
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return losses, cfg.beta * zc, cfg.beta * zr


def pair_count(rows: torch.Tensor) -> torch.Tensor:
    """Pairs in a batch of preference rows: the highest example id of a row is twice its pair count."""
    return (rows[:, 1].amax(1) // 2).sum().double()


def chosen_tokens(rows: torch.Tensor) -> torch.Tensor:
    """Reply tokens of the chosen examples of a batch (the SFT term's denominator)."""
    _, examples, weights = unpack(rows)
    return (weights * (examples[:, 1:] % 2 == 1)).sum().double()


class Preference:
    """The objective of train.objective = "dpo" for `trainer.train.train_step`: per micro-batch, the pairs' losses
    divided by the step's global pair count; their STATS sums are added up on device until `take_stats`."""

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg
        self.stats: torch.Tensor | None = None

    def totals(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """(pairs, chosen reply tokens) of the step on all ranks."""
        totals = torch.stack([sum(pair_count(b) for b in micro_batches), sum(chosen_tokens(b) for b in micro_batches)])
        dist.all_reduce(totals)
        return totals.clamp(min=1.0)

    def pair_stats(self, sums: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
        """(each pair's loss, STATS sums) of a batch of rows, from its examples' log-probs (`example_logps`)."""
        present = counts[:, 2::2] > 0
        policy, lengths = pairs_of(sums, present), pairs_of(counts, present)
        reference = pairs_of(reference_plane(rows), present) if self.cfg.needs_reference else None
        losses, reward_c, reward_r = pair_losses(self.cfg, policy, reference, lengths)
        stats = torch.stack([losses.sum(), reward_c.sum(), reward_r.sum(), (reward_c > reward_r).double().sum(),
                             (reward_c - reward_r).sum(), policy[0].sum(), policy[1].sum(),
                             present.sum().double()])
        return losses, stats.detach()

    def loss(self, model: nn.Module, batch: torch.Tensor, totals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this batch's part of the step's loss, MoE auxiliary loss); its STATS join the window's. An empty batch (a
        rank short of rows) runs a one-row forward of zeros: no pairs, a zero loss that still reaches every
        parameter."""
        logits, _, _, aux = forward_rows(model, batch)
        rows = batch if len(batch) else torch.zeros((1, *batch.shape[1:]), dtype=batch.dtype, device=batch.device)
        sums, counts = example_logps(logits, rows)
        losses, stats = self.pair_stats(sums, counts, rows)
        loss = losses.sum() / totals[0]
        if self.cfg.sft_weight:
            loss = loss - self.cfg.sft_weight * sums[:, 1::2].sum() / totals[1]
        self.stats = stats if self.stats is None else self.stats + stats
        return loss.float(), aux * (1.0 if len(batch) else 0.0)

    def take_stats(self) -> torch.Tensor | None:
        """This rank's STATS sums since the last call (None if no step ran)."""
        stats, self.stats = self.stats, None
        return stats


@torch.no_grad()
def held_out_metrics(objective: Preference, model: nn.Module, held, device: torch.device) -> dict:
    """The loss, rewards and log-probs of a held-out slice's pairs (`trainer.eval.heldout.HeldOut`), as val_*:
    collective, the same on any world size."""
    total = torch.zeros(len(STATS), dtype=torch.float64, device=device)
    for rows, _ in held.rows():
        rows = rows.to(device)
        logits = forward_rows(model, rows)[0]
        if len(rows):
            total += objective.pair_stats(*example_logps(logits, rows), rows)[1]
    dist.all_reduce(total)
    return step_metrics(total, prefix="val_")


def step_metrics(stats: torch.Tensor, prefix: str = "") -> dict:
    """Means over pairs of summed STATS (all ranks' sums): the loss, rewards and log-probs of the logs."""
    values = stats.tolist()
    pairs = max(values[-1], 1.0)
    return {f"{prefix}{name}": value / pairs for name, value in zip(STATS[:-1], values[:-1])}
