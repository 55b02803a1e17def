"""Generation: greedy or sampled decoding (temperature, top-k, top-p) through the model's KV cache."""

from __future__ import annotations

import torch

from trainer.model.transformer import Transformer


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generator=None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filtered(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def sample_rows(logits: torch.Tensor, generators: list[torch.Generator], *, temperature: float, top_p: float
                ) -> torch.Tensor:
    """Next token ids (B,) with row i drawn by generators[i] alone (one uniform, inverted through the row's
    cumulative distribution): a row's sample depends on its own seed and logits, never on which rows share its
    batch. Greedy at temperature 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    cdf = filtered(logits, temperature=temperature, top_k=0, top_p=top_p).softmax(-1).cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, device=logits.device) for g in generators])
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(-1)  # a token of mass > 0


def filtered(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """fp32 logits / temperature with tokens outside the top-k and the nucleus of mass top_p set to -inf."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        drop = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, *, eos_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> list[int]:
    """prompt_ids followed by up to `max_new_tokens` tokens; stops after `eos_id` or at the context limit
    (max_seq_len). With the KV cache each new token costs one single-position forward; without it, a full forward
    over the sequence so far (the reference the cache is tested against)."""
    if not 0 < len(prompt_ids) <= model.cfg.max_seq_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens; it must hold 1 to max_seq_len={model.cfg.max_seq_len}")
    device = model.tok_embeddings.weight.device
    max_len = min(model.cfg.max_seq_len, len(prompt_ids) + max_new_tokens)
    cache = model.new_cache(max_len) if use_cache else None
    out = list(prompt_ids)
    logits, _ = model(torch.tensor([out], device=device), cache, 0)  # (1, T, V)
    while len(out) < max_len:
        nxt = sample_next(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        out.append(int(nxt))
        if out[-1] == eos_id or len(out) == max_len:
            break
        if use_cache:
            logits, _ = model(nxt.view(1, 1), cache, len(out) - 1)
        else:
            logits, _ = model(torch.tensor([out], device=device))
    return out


@torch.no_grad()
def generate_group(model: Transformer, prompt_ids: list[int], seeds: list[int], max_new_tokens: int, *,
                   temperature: float, top_p: float = 1.0, stop_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """One reply per seed to the same prompt, decoded together through one KV cache: each reply ends after its
    first stop token or at `max_new_tokens` (or the context limit). Reply i is drawn by a generator seeded with
    seeds[i] alone (`sample_rows`), so it is the same whatever else is decoded beside it."""
    device = model.tok_embeddings.weight.device
    rows = len(seeds)
    max_len = min(model.cfg.max_seq_len, len(prompt_ids) + max_new_tokens)
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    cache = model.new_cache(max_len)
    logits, _ = model(torch.tensor([prompt_ids] * rows, device=device), cache, 0)
    replies: list[list[int]] = [[] for _ in range(rows)]
    open_rows = set(range(rows))
    for position in range(len(prompt_ids), max_len):
        nxt = sample_rows(logits[:, -1], generators, temperature=temperature, top_p=top_p)
        for i, token in enumerate(nxt.tolist()):
            if i in open_rows:
                replies[i].append(token)
                if token in stop_ids:
                    open_rows.discard(i)
        if not open_rows or position + 1 == max_len:
            break
        logits, _ = model(nxt.view(rows, 1), cache, position)
    return replies
