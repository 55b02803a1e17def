"""The language-model loss of a batch of rows: next-token cross-entropy in fp32 over the targets that carry loss.

Pretraining rows are one token stream, every target counts; chat rows carry the example index and loss mask beside
the tokens (raylm.dataset.PLANES), and only reply tokens of their own example count. Training, held-out
evaluation and the tests all compute it here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def unpack(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(tokens (B, T+1), segments (B, T+1) or None, target weights (B, T) or None) of a batch. Pretraining rows
    (B, T+1) are one token stream: every target counts. Chat rows (B, 3, T+1) hold the example index and loss mask
    beside the tokens (raylm.dataset.PLANES): a target counts if it carries loss and its example is its input's."""
    if rows.dim() == 2:
        return rows, None, None
    tokens, segments, loss = rows[:, 0], rows[:, 1], rows[:, 2]  # preference rows carry a fourth plane
    weights = (loss[:, 1:] > 0) & (segments[:, 1:] == segments[:, :-1])
    return tokens, segments, weights.float()


def count_loss_tokens(batch: torch.Tensor) -> torch.Tensor | int:
    """Targets of `batch` that carry loss."""
    _, _, weights = unpack(batch)
    return batch[:, 1:].numel() if weights is None else weights.sum()


def masked_loss_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32 over the targets that carry loss (all of them without weights)."""
    if weights is None:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * weights.flatten()).sum()


def forward_rows(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                                   torch.Tensor]:
    """(logits (B, T, V), targets (B, T), target weights or None, MoE auxiliary loss) of a batch of rows. An empty
    batch (a rank short of rows) runs a one-row forward of zeros instead, so FSDP's collectives still line up."""
    rows = batch if len(batch) else torch.zeros((1, *batch.shape[1:]), dtype=batch.dtype, device=batch.device)
    tokens, segments, weights = unpack(rows)
    logits, aux = model(tokens[:, :-1], segments=None if segments is None else segments[:, :-1])
    return logits, tokens[:, 1:], weights, aux


def lm_loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy over loss-carrying targets, MoE auxiliary loss) for a batch of rows; an
    empty batch's loss counts zero."""
    logits, targets, weights, aux = forward_rows(model, batch)
    loss = masked_loss_sum(logits, targets, weights)
    return (loss, aux) if len(batch) else (loss * 0.0, aux * 0.0)


class TokenMean:
    """The language-model objective of `trainer.train.train_step`: each loss-carrying target's NLL divided by the
    step's global count of them, so the loss is the mean over the step's targets on any world size."""

    def totals(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """The step's count of loss-carrying targets on all ranks (a device sum for chat rows: no host sync)."""
        count = torch.zeros((), device=micro_batches[0].device)
        for batch in micro_batches:
            count += count_loss_tokens(batch)
        dist.all_reduce(count)
        return count.clamp(min=1.0)  # a chat step whose examples were all prompt: a zero loss, not 0 / 0

    def loss(self, model: nn.Module, batch: torch.Tensor, totals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this batch's part of the step's loss, MoE auxiliary loss)."""
        loss_sum, aux = lm_loss(model, batch)
        return loss_sum / totals, aux
