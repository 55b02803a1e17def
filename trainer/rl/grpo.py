"""GRPO's update (DeepSeekMath, Shao et al. 2024, eq. 3): group-relative advantages, the clipped policy-gradient
loss over reply tokens and the k3 estimate of the KL to the reference policy, aggregated as a token mean over the
whole step (veRL's `token-mean`), so the update is the same on any number of workers.

Per reply token t of sample i, with ratio r = π_θ / π_old and δ = log π_ref − log π_θ:

    loss_it = −min(r · A_i, clip(r, 1 − ε, 1 + ε) · A_i) + β · (exp(δ) − δ − 1)

and the step's loss is Σ_it loss_it / (the step's count of reply tokens on all workers). Advantages: GRPO's
A_i = (R_i − mean(R_group)) / (std(R_group) + 1e-6), or Dr. GRPO's (Liu et al. 2025) A_i = R_i − mean(R_group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ADVANTAGES = ("grpo", "drgrpo")
STATS = ("clipped", "kl", "entropy", "tokens")
"""What `GRPO` sums over reply tokens for the metrics (all-reduced at log steps): tokens where the clip bound
was the smaller term, the k3 KL, the policy's entropy, and the count."""


def group_advantages(rewards: torch.Tensor, *, kind: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """Advantages (P, G) of rewards (P prompts, G samples each): each reward less its group's mean, divided by the
    group's standard deviation (unbiased, as torch.std and veRL) for GRPO; a group of one sample has advantage 0."""
    if kind not in ADVANTAGES:
        raise ValueError(f"advantage kind {kind!r}: expected one of {ADVANTAGES}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if kind == "drgrpo" or rewards.shape[1] < 2:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def token_losses(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                 advantages: torch.Tensor, *, clip_eps: float, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                        torch.Tensor]:
    """(per-token loss, whether the clip bound was taken, k3 KL) for log-probs of the sampled tokens (B, T) under
    the policy, the policy that sampled them and the reference, and advantages broadcast to (B, T)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    loss = -torch.minimum(unclipped, clipped)
    taken = clipped < unclipped
    if ref_logp is None:
        kl = torch.zeros_like(logp)
    else:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
    return loss + kl_coef * kl, taken, kl


@dataclass
class RolloutBatch:
    """A micro-batch of sampled sequences for the update: tokens (B, T+1) (prompt, reply, padding), which targets
    are reply tokens (B, T), each sequence's advantage (B,), and the reference's log-probs of the targets (B, T) or
    None without a KL term. `old_logp` is the policy's own, taken at the step's first pass and kept for the others."""

    tokens: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    ref_logp: torch.Tensor | None
    old_logp: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def device(self) -> torch.device:
        return self.tokens.device


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each target, entropy of each position's distribution), in fp32: the one computation of a reply's
    log-probs, for the policy in the update and for the reference in the rollout actors."""
    logp_all = F.log_softmax(logits.float(), dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy


class GRPO:
    """The objective `trainer.train.train_step` runs for an RL step: each reply token's loss divided by the step's
    global count of reply tokens."""

    def __init__(self, *, clip_eps: float, kl_coef: float):
        self.clip_eps, self.kl_coef = clip_eps, kl_coef
        self.stats: torch.Tensor | None = None

    def totals(self, micro_batches: list[RolloutBatch]) -> torch.Tensor:
        count = torch.zeros((), device=micro_batches[0].device)
        for batch in micro_batches:
            count += batch.mask.sum()
        dist.all_reduce(count)
        return count.clamp(min=1.0)

    def loss(self, model: nn.Module, batch: RolloutBatch, totals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this micro-batch's part of the step's loss, MoE auxiliary loss). A rank with no sequences in this
        micro-batch runs a one-row forward of zeros so FSDP's collectives line up, and adds nothing."""
        tokens = batch.tokens if len(batch) else torch.zeros((1, batch.tokens.shape[1]), dtype=torch.long,
                                                              device=batch.device)
        logits, aux = model(tokens[:, :-1])
        if not len(batch):
            return logits.sum() * 0.0, aux * 0.0
        logp, entropy = target_logps(logits, tokens[:, 1:])
        if batch.old_logp is None:  # the step's first pass: the weights that sampled the batch
            batch.old_logp = logp.detach()
        losses, taken, kl = token_losses(logp, batch.old_logp, batch.ref_logp, batch.advantages[:, None],
                                         clip_eps=self.clip_eps, kl_coef=self.kl_coef)
        mask = batch.mask
        stats = torch.stack([(taken * mask).sum(), (kl.detach() * mask).sum(), (entropy.detach() * mask).sum(),
                             mask.sum()]).double()
        self.stats = stats if self.stats is None else self.stats + stats
        return (losses * mask).sum() / totals, aux

    def take_stats(self) -> torch.Tensor | None:
        stats, self.stats = self.stats, None
        return stats
