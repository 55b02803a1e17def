"""Held-out loss, perplexity and bits per byte of a dataset's val split, per source when the dataset records
sources: a collective over ranks that gives the same figures on any world size.

A row's loss is computed in the same micro-batch on any W (`trainer.data.rank_micro_batches`), so only the order of
a float64 sum differs. Bits per byte = total NLL / (ln 2 × UTF-8 bytes of the targets scored), each token counting
the bytes of text it stands for (`Tokenizer.token_bytes`; 0 for EOS), so models with different tokenizers compare.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.data import rank_micro_batches, rows_per_source, val_rows
from trainer.loss import forward_rows


@dataclass
class HeldOut:
    """This rank's part of one held-out slice."""

    name: str
    split: object
    """The dataset's val split (`raylm.dataset.Split`)."""
    batches: list[np.ndarray]
    """Row indices of each micro-batch this rank runs (every rank has as many; the last ones may be empty)."""
    sources: np.ndarray
    """Source id of every row of the split."""
    source_names: list[str]
    token_bytes: torch.Tensor
    cache: list[np.ndarray] | None = None
    """The rows as read (in the dataset's dtype), kept after the first pass when the slice is evaluated again and
    again (in the training loop)."""
    edges: tuple[int, ...] = ()
    """Position buckets [edges[i], edges[i+1]) of the loss by position (none: not asked for)."""

    def rows(self):
        """(rows, their source ids) of each micro-batch; the next micro-batch is read while this one is scored (and
        every one kept when caching)."""
        if self.cache is not None and len(self.cache) == len(self.batches):
            reads = iter(self.cache)
        else:
            if self.cache is not None:
                self.cache.clear()  # a pass cut short by an error left part of it
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylm-heldout")
            ahead = [pool.submit(self._read, chosen) for chosen in self.batches[:1]]
            reads = self._read_ahead(pool, ahead)
        for chosen, data in zip(self.batches, reads):
            yield torch.from_numpy(data.astype(np.int64)), torch.from_numpy(self.sources[chosen].astype(np.int64))

    def _read_ahead(self, pool: ThreadPoolExecutor, ahead: list):
        try:
            for i in range(len(self.batches)):
                data = ahead.pop(0).result()
                if i + 1 < len(self.batches):
                    ahead.append(pool.submit(self._read, self.batches[i + 1]))
                if self.cache is not None:
                    self.cache.append(data)
                yield data
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _read(self, chosen: np.ndarray) -> np.ndarray:
        return self.split.rows(chosen) if len(chosen) else np.zeros((0, *self.split.shape), np.int64)


def position_edges(seq_len: int, first: int = 64) -> tuple[int, ...]:
    """Bucket edges 0, 64, 128, 256, … up to seq_len: the loss of each octave of positions."""
    edges = [0]
    while edges[-1] < seq_len:
        edges.append(min(seq_len, max(first, 2 * edges[-1])))
    return tuple(edges)


def held_out(dataset, *, name: str, token_bytes: np.ndarray, rows: int, seed: int, micro_batch: int, rank: int,
             world: int, per_source: bool = False, keep: bool = False, split=None, by_position: bool = False
             ) -> HeldOut:
    """This rank's part of a seeded sample of the dataset's val split (or of `split`, the val split as the job reads
    it: preference rows with their reference log-probs): `rows` rows of it, or with `per_source` `rows` of each
    source (0: all rows). `token_bytes`: its tokenizer's (`Tokenizer.token_bytes`). `by_position`: also the loss of
    each octave of positions (`position_edges`): does the loss keep falling deep into the context?"""
    split = dataset.val if split is None else split
    sources = split.row_sources()
    sources = np.zeros(len(split), np.int32) if sources is None else sources
    chosen = rows_per_source(sources, rows=rows, seed=seed) if per_source else \
        val_rows(len(split), rows=rows or len(split), seed=seed)
    return HeldOut(name, split, rank_micro_batches(chosen, micro_batch=micro_batch, rank=rank, world=world), sources,
                   dataset.source_names or [name], torch.from_numpy(token_bytes), [] if keep else None,
                   position_edges(split.shape[-1] - 1) if by_position else ())


def row_losses(model, rows: torch.Tensor, token_bytes: torch.Tensor, edges: tuple[int, ...] = ()
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """((rows, 3): each row's summed NLL, targets scored and their UTF-8 bytes; (buckets, 3): the same summed over
    the rows by position bucket `edges`). Chat rows score only the targets that carry loss (trainer.loss.unpack).
    The fp32 cross-entropy goes a row at a time: a batch's (B, T, vocab) fp32 copy would not fit beside a large
    vocabulary."""
    logits, targets, weights, _ = forward_rows(model, rows)
    weights = torch.ones(targets.shape, device=targets.device) if weights is None else weights
    nll = torch.stack([F.cross_entropy(logits[i].float(), targets[i], reduction="none") * weights[i]
                       for i in range(len(targets))])  # (B, T)
    nbytes = token_bytes[targets].float() * weights
    per_target = torch.stack([nll, weights, nbytes], -1).double()[:len(rows)]  # an empty batch's dummy row: none
    buckets = torch.stack([per_target[:, lo:hi].sum((0, 1)) for lo, hi in zip(edges[:-1], edges[1:])]) if edges \
        else per_target.new_zeros((0, 3))
    return per_target.sum(1), buckets


@torch.no_grad()
def loss_sums(model, held: HeldOut, device: torch.device) -> torch.Tensor:
    """(sources + position buckets, 3) float64 sums over all ranks' rows: NLL, targets, bytes. Collective."""
    buckets = max(len(held.edges) - 1, 0)
    sums = torch.zeros((len(held.source_names) + buckets, 3), dtype=torch.float64, device=device)
    token_bytes = held.token_bytes.to(device)
    for rows, sources in held.rows():
        per_row, by_position = row_losses(model, rows.to(device), token_bytes, held.edges)
        sums[:len(held.source_names)].index_add_(0, sources.to(device), per_row)
        sums[len(held.source_names):] += by_position
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
    """The slice's figures, each source's (under "by_source") when the dataset records more than one, and each
    position bucket's loss (under "loss_by_position", "LO-HI": loss) when asked for."""
    sources, positions = sums[:len(held.source_names)], sums[len(held.source_names):]
    out = figures(*sources.sum(0).tolist())
    if len(held.source_names) > 1:
        out["by_source"] = {name: figures(*sources[i].tolist()) for i, name in enumerate(held.source_names)
                            if sources[i, 1] > 0}
    if len(positions):
        out["loss_by_position"] = {f"{lo}-{hi}": figures(*positions[i].tolist())["loss"]
                                   for i, (lo, hi) in enumerate(zip(held.edges[:-1], held.edges[1:]))}
    return out


def flat_metrics(prefix: str, figures_: dict) -> dict:
    """Metric names for a sink: `{prefix}loss|ppl|bpb`, and per source `{prefix}loss/{source}` and
    `{prefix}bpb/{source}`, and by position bucket `{prefix}loss_at/LO-HI`."""
    out = {f"{prefix}{k}": figures_[k] for k in ("loss", "ppl", "bpb")}
    for source, f in figures_.get("by_source", {}).items():
        out |= {f"{prefix}loss/{source}": f["loss"], f"{prefix}bpb/{source}": f["bpb"]}
    for bucket, loss in figures_.get("loss_by_position", {}).items():
        out[f"{prefix}loss_at/{bucket}"] = loss
    return out
