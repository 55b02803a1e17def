"""Held-out loss, perplexity and bits per byte of a dataset's val split, per source when the dataset records
sources: a collective over ranks that gives the same figures on any world size.

A row's loss is computed in the same micro-batch on any W (`trainer.data.val_micro_batches`), so only the order of
a float64 sum differs. Bits per byte = total NLL / (ln 2 × UTF-8 bytes of the targets scored), each token counting the bytes of
text it stands for (`Tokenizer.token_bytes`; 0 for EOS), so models with different tokenizers compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.data import val_micro_batches


@dataclass
class HeldOut:
    """This rank's part of one held-out slice."""

    name: str
    split: object
    """The dataset's val split (`dataprep.dataset.Split`)."""
    batches: list[np.ndarray]
    """Row indices of each micro-batch this rank runs (every rank has as many; the last ones may be empty)."""
    sources: np.ndarray
    """Source id of every row of the split."""
    source_names: list[str]
    token_bytes: torch.Tensor
    cache: list[np.ndarray] | None = None
    """The rows as read (in the dataset's dtype), kept after the first pass when the slice is evaluated again and
    again (in the training loop)."""

    def rows(self):
        """(rows, their source ids) of each micro-batch, read as needed (and kept when caching)."""
        for i, chosen in enumerate(self.batches):
            if self.cache is not None and i < len(self.cache):
                data = self.cache[i]
            else:
                data = self.split.rows(chosen) if len(chosen) else np.zeros((0, *self.split.shape), np.int64)
                if self.cache is not None:
                    self.cache.append(data)
            yield torch.from_numpy(data.astype(np.int64)), torch.from_numpy(self.sources[chosen].astype(np.int64))


def held_out(dataset, *, name: str, token_bytes: np.ndarray, rows: int, seed: int, micro_batch: int, rank: int,
             world: int, keep: bool = False) -> HeldOut:
    """This rank's part of `rows` seeded rows of the dataset's val split (all of them when rows is 0);
    `token_bytes`: its tokenizer's (`Tokenizer.token_bytes`)."""
    split = dataset.val
    mine = val_micro_batches(len(split), rows=rows or len(split), seed=seed, micro_batch=micro_batch, rank=rank,
                             world=world)
    sources = split.row_sources()
    names = dataset.source_names or [name]
    return HeldOut(name, split, mine, np.zeros(len(split), np.int32) if sources is None else sources, names,
                   torch.from_numpy(token_bytes), [] if keep else None)


def row_losses(model, rows: torch.Tensor, token_bytes: torch.Tensor) -> torch.Tensor:
    """(rows, 3): each row's summed NLL, targets scored and their UTF-8 bytes. Chat rows score only the targets that
    carry loss (trainer.train.unpack)."""
    from trainer.train import forward_rows

    logits, targets, weights, _ = forward_rows(model, rows)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    weights = torch.ones_like(losses) if weights is None else weights
    nbytes = token_bytes.to(targets.device)[targets].float()
    return torch.stack([(losses * weights).sum(1), weights.sum(1), (nbytes * weights).sum(1)], 1).double()


@torch.no_grad()
def loss_sums(model, held: HeldOut, device: torch.device) -> torch.Tensor:
    """(sources, 3) float64 sums over all ranks' rows: NLL, targets, bytes. Collective."""
    sums = torch.zeros((len(held.source_names), 3), dtype=torch.float64, device=device)
    for rows, sources in held.rows():
        per_row = row_losses(model, rows.to(device), held.token_bytes)
        sums.index_add_(0, sources.to(device), per_row[:len(rows)])  # an empty batch's one dummy row counts nothing
    if dist.is_initialized():
        dist.all_reduce(sums)
    return sums


def figures(nll: float, targets: float, nbytes: float) -> dict:
    """Mean loss, perplexity and bits per byte of summed NLL over `targets` tokens spelling `nbytes` bytes."""
    loss = nll / targets if targets else float("nan")
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
            "bpb": nll / (math.log(2) * nbytes) if nbytes else float("nan"), "tokens": int(targets),
            "bytes": int(nbytes)}


def report(held: HeldOut, sums: torch.Tensor) -> dict:
    """The slice's figures, and each source's (under "by_source") when the dataset records more than one."""
    out = figures(*sums.sum(0).tolist())
    if len(held.source_names) > 1:
        out["by_source"] = {name: figures(*sums[i].tolist()) for i, name in enumerate(held.source_names)
                            if sums[i, 1] > 0}
    return out


def flat_metrics(prefix: str, figures_: dict, keys: tuple[str, ...] = ("loss", "ppl", "bpb")) -> dict:
    """Metric names for a sink: `{prefix}loss`, … and per source `{prefix}loss/{source}`, `{prefix}bpb/{source}`."""
    out = {f"{prefix}{k}": figures_[k] for k in keys}
    for source, f in figures_.get("by_source", {}).items():
        out |= {f"{prefix}loss/{source}": f["loss"], f"{prefix}bpb/{source}": f["bpb"]}
    return out
