"""Generation: greedy or sampled decoding (temperature, top-k, top-p) through the model's KV cache."""

from __future__ import annotations

import torch

from trainer.model.transformer import Transformer


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generator=None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        drop = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


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
