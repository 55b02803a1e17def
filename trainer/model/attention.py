"""Attention: rotary embeddings (computed as transformers computes them), grouped-query attention over SDPA or
FlexAttention, the KV cache for incremental decoding, and the masks that keep packed examples from attending to
each other (a (B, 1, T, T) boolean for SDPA, a BlockMask for FlexAttention)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from trainer.model.config import ModelConfig


def rope_frequencies(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim / 2,) in fp32, the factor cos and sin are multiplied by), computed exactly as
    transformers' rope utilities compute them for each kind of model.rope_scaling."""
    dim, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_factor
    exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
    inv_freq = 1.0 / base ** exponents
    if cfg.rope_scaling == "linear":
        return inv_freq / factor, 1.0
    if cfg.rope_scaling == "llama3":
        return llama3_frequencies(inv_freq, cfg), 1.0
    if cfg.rope_scaling == "yarn":
        return yarn_frequencies(cfg, device), cfg.rope_attention_factor or 0.1 * math.log(factor) + 1.0
    return inv_freq, 1.0


def llama3_frequencies(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    factor, low, high, context = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                                  cfg.rope_original_max_seq_len)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, smoothed, scaled)


def yarn_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """YaRN's blend (Peng et al. 2023; transformers' `_compute_yarn_parameters` with truncate): dimension d keeps
    its frequency where it turns more than beta_fast times within the original context, is divided by the factor
    where it turns fewer than beta_slow times, and ramps linearly between."""
    dim, base, context = cfg.head_dim, cfg.rope_theta, cfg.rope_original_max_seq_len

    def dimension_of(rotations: float) -> float:
        return (dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(dimension_of(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(dimension_of(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp
    return (1.0 / (cfg.rope_factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim) in fp32, Hugging Face's half-split layout."""
    positions = torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32)
    inv_freq, scale = rope_frequencies(cfg, device)
    freqs = torch.outer(positions, inv_freq)  # (max_seq_len, head_dim / 2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (T, hd), or (B, 1, T, hd) when positions differ by row (packed examples)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class KVCache:
    """Per-layer key/value buffers for incremental decoding. Each layer's buffer is allocated at its first write with
    the dtype and device attention computes in: under a mixed-precision policy (FSDP bf16) that is not the
    parameters' dtype."""

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, KV, T, hd) at positions start..start+T-1; return all keys/values up to there."""
        if self.k[layer] is None:
            B, KV, _, hd = k.shape
            self.k[layer], self.v[layer] = k.new_zeros(B, KV, self.max_len, hd), v.new_zeros(B, KV, self.max_len, hd)
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, start: int = 0,
                mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        """`mask`: which keys each query may see when it is not plain causal attention (packed examples): a
        (B, 1, T, T) boolean mask for SDPA or a FlexAttention BlockMask."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.kv_heads != self.n_heads
        if isinstance(mask, BlockMask):
            out = flex(q, k, v, mask, gqa)  # (B, H, T, hd)
            return self.wo(out.transpose(1, 2).reshape(B, T, -1))
        causal = mask is None
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
            if start > 0:  # queries at positions start.. attend to every cached key up to their own position
                causal = False
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)  # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


def attention_kernel(attention: str, device: torch.device) -> str:
    """The kernel `attention` ('auto', 'sdpa' or 'flex') means on `device`: 'auto' is flex on CUDA, sdpa elsewhere."""
    if attention == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return attention


@functools.cache
def _compiled(fn):
    """`fn` compiled once per process: eager FlexAttention is a slow reference, and a compiled create_block_mask
    never builds the (T, T) mask in memory."""
    return torch.compile(fn)


def flex(q, k, v, block_mask: BlockMask, gqa: bool) -> torch.Tensor:
    """FlexAttention, compiled (on CPU it has a forward only: training there uses SDPA)."""
    return _compiled(flex_attention)(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def positions_in_segments(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token within its segment (a run of equal ids): 0 at each segment's first token."""
    T = segments.shape[1]
    index = torch.arange(T, device=segments.device).expand_as(segments)
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.where(first, index, 0).cummax(dim=1).values


def block_causal_mask(segments: torch.Tensor, *, flex: bool) -> torch.Tensor | BlockMask:
    """Query i sees key j iff j <= i in the same segment: a dense (B, 1, T, T) boolean mask, or a BlockMask."""
    B, T = segments.shape
    if flex:
        def same_segment_causal(b, h, q, kv):
            return (kv <= q) & (segments[b, q] == segments[b, kv])

        return _compiled(create_block_mask)(same_segment_causal, B, None, T, T, device=segments.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return (causal & (segments[:, :, None] == segments[:, None, :])).unsqueeze(1)
