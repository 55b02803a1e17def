"""Llama-style decoder in plain PyTorch: RoPE, grouped-query attention, SwiGLU or top-k MoE, RMSNorm.

No distributed code here: FSDP2, activation checkpointing and compile are applied from `trainer/parallelize.py`.
Layouts follow Hugging Face (rotate-half RoPE, so q/k need no permutation; MoE experts stacked as (E, 2H, D)
gate‖up and (E, D, H) down tensors), so weights map 1:1 to `LlamaForCausalLM` / `MixtralForCausalLM` (`trainer/hf.py`).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

RESIDUAL_OUTPUTS = ("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.experts_w2")
HIDDEN_MATRICES = ("attention.wq.", "attention.wk.", "attention.wv.", "attention.wo.", "feed_forward.w1.",
                   "feed_forward.w2.", "feed_forward.w3.", "feed_forward.experts_w13", "feed_forward.experts_w2",
                   "feed_forward.gate.")
"""μP's hidden matrices: every matrix whose fan-in grows with width except the LM head. The MoE router is one too:
its fan-out (the experts) is fixed, but its update grows with its fan-in as a hidden matrix's does, so it trains at
lr / m; it starts at std / √m like them (strict μP would give this output-like matrix std / m: at init the router's
logits are then larger by √m, a softer start the training lr does not depend on)."""
ATTENTION = ("auto", "sdpa", "flex")
NOT_IN_WEIGHTS = ("attention", "max_seq_len")
"""ModelConfig fields that change no weight: the attention kernel, and the RoPE table's length. A checkpoint loads
into a model that differs from it only in these."""


@dataclass(kw_only=True)
class ModelConfig:
    """The [model] section: architecture and init. Invalid values raise ValueError naming the field (this file imports
    only torch; `raylm.config` turns it into a ConfigError)."""

    vocab_size: int = 32000
    """Vocabulary size; the trainer sets it from the dataset's tokenizer."""
    dim: int = 512
    """Model (residual stream) width."""
    n_layers: int = 8
    """Transformer blocks."""
    n_heads: int = 8
    """Query heads; head_dim = dim / n_heads."""
    n_kv_heads: int = 0
    """Key/value heads for grouped-query attention (0 = n_heads, i.e. plain multi-head)."""
    ffn_hidden: int = 0
    """SwiGLU hidden size (0 = multiple_of-rounded ffn_multiplier · 8/3 · dim, as Llama)."""
    ffn_multiplier: float = 1.0
    """Scales the default SwiGLU hidden size."""
    multiple_of: int = 256
    """The default SwiGLU hidden size is rounded up to a multiple of this."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: float = 0.0
    """Llama-3.1 RoPE scaling factor (8 in Llama-3.1/3.2; 0 = none): long wavelengths slowed by this factor."""
    rope_low_freq_factor: float = 1.0
    """Llama-3.1 RoPE scaling: wavelengths above original_max_seq_len / this are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """Llama-3.1 RoPE scaling: wavelengths below original_max_seq_len / this are kept; smooth in between."""
    rope_original_max_seq_len: int = 8192
    """Llama-3.1 RoPE scaling: the context length the unscaled model was trained at."""
    max_seq_len: int = 2048
    """Longest sequence (RoPE table size and KV-cache limit); the trainer raises it to the dataset's seq_len."""
    tie_embeddings: bool = False
    """Share the token embedding with the LM head."""
    n_experts: int = 0
    """Mixture-of-Experts FFN with this many experts per block (0 = dense SwiGLU)."""
    top_k: int = 2
    """Experts per token (MoE)."""
    aux_loss_weight: float = 0.01
    """Weight of the MoE load-balancing loss added to the LM loss."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections get init_std / sqrt(2 · n_layers)."""
    mup_base_dim: int = 0
    """μP (maximal update parametrisation, for AdamW) with width multiplier m = dim / mup_base_dim: hidden matrices
    are initialised with std / sqrt(m) and trained at lr / m with weight decay × m (so lr · weight decay, AdamW's
    shrink per step, is the same at every width), the LM head's logits are scaled by 1 / m; embeddings, norms and
    the head train at lr. The best lr of a model of width mup_base_dim is then the best lr at any width (grown by
    heads of the same head_dim). 0 = the standard parametrisation."""
    attention: str = "auto"
    """Kernel for packed examples (chat data), where attention is block-causal: 'flex', FlexAttention's
    block-sparse kernel (compiled; it never builds a (T, T) mask), or 'sdpa' with a dense (T, T) boolean mask per
    row, which CUDA runs in its slow math kernel; 'auto' = flex on CUDA, sdpa elsewhere (FlexAttention has no
    backward on CPU). Plain causal attention always uses SDPA's causal kernel. Not part of the architecture: any
    value loads any weights."""

    def __post_init__(self):
        n_kv = self.n_kv_heads or self.n_heads
        checks = [
            (self.vocab_size > 0, "vocab_size", self.vocab_size, "must be > 0"),
            (self.dim > 0, "dim", self.dim, "must be > 0"),
            (self.n_layers > 0, "n_layers", self.n_layers, "must be > 0"),
            (self.n_heads > 0 and self.dim % self.n_heads == 0, "n_heads", self.n_heads, f"must divide dim={self.dim}"),
            (self.n_heads % n_kv == 0, "n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}"),
            ((self.dim // max(self.n_heads, 1)) % 2 == 0, "n_heads", self.n_heads, "must give an even head_dim"),
            (self.n_experts >= 0, "n_experts", self.n_experts, "must be >= 0"),
            (not self.n_experts or 1 <= self.top_k <= self.n_experts, "top_k", self.top_k, "must be in [1, n_experts]"),
            (self.max_seq_len > 0, "max_seq_len", self.max_seq_len, "must be > 0"),
            (self.rope_theta > 0, "rope_theta", self.rope_theta, "must be > 0"),
            (self.rope_scaling == 0 or self.rope_scaling >= 1, "rope_scaling", self.rope_scaling, "must be 0 or >= 1"),
            (self.rope_high_freq_factor > self.rope_low_freq_factor > 0, "rope_high_freq_factor",
             self.rope_high_freq_factor, f"must be > rope_low_freq_factor={self.rope_low_freq_factor} > 0"),
            (self.ffn_hidden >= 0, "ffn_hidden", self.ffn_hidden, "must be >= 0"),
            (self.ffn_multiplier > 0, "ffn_multiplier", self.ffn_multiplier, "must be > 0"),
            (self.multiple_of > 0, "multiple_of", self.multiple_of, "must be > 0"),
            (self.norm_eps > 0, "norm_eps", self.norm_eps, "must be > 0"),
            (self.aux_loss_weight >= 0, "aux_loss_weight", self.aux_loss_weight, "must be >= 0"),
            (self.init_std > 0, "init_std", self.init_std, "must be > 0"),
            (self.mup_base_dim >= 0, "mup_base_dim", self.mup_base_dim, "must be >= 0 (0 = off)"),
            (self.attention in ATTENTION, "attention", self.attention, f"must be one of {', '.join(ATTENTION)}"),
        ]
        for ok, name, value, rule in checks:
            if not ok:
                raise ValueError(f"model.{name}={value} {rule}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def width_mult(self) -> float:
        """μP's width multiplier m = dim / mup_base_dim (1 without μP)."""
        return self.dim / self.mup_base_dim if self.mup_base_dim else 1.0

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used (n_kv_heads, or n_heads when it is 0)."""
        return self.n_kv_heads or self.n_heads

    @property
    def hidden(self) -> int:
        """SwiGLU hidden size of the dense FFN and of each expert."""
        if self.ffn_hidden:
            return self.ffn_hidden
        raw = int(self.ffn_multiplier * 8 * self.dim / 3)
        return self.multiple_of * math.ceil(raw / self.multiple_of)

    def num_params(self, *, embeddings: bool = True, active: bool = False) -> int:
        """Parameter count, with or without the token embedding (an untied LM head always counts). `active`: experts
        counted top_k times instead of n_experts, the parameters one token's forward actually uses."""
        d, hd = self.dim, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.kv_heads * 2)
        if self.n_experts:
            experts = self.top_k if active else self.n_experts
            ffn = experts * 3 * d * self.hidden + self.n_experts * d
        else:
            ffn = 3 * d * self.hidden
        body = self.n_layers * (attn + ffn + 2 * d) + d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return body + head + (self.vocab_size * d if embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), for MFU: 6 · N + 12 · L · H · head_dim · T.

        N: the active non-embedding parameters plus the LM head (a tied head still does its matmul), as torchtitan
        and PaLM count them; the embedding lookup is free. 12·L·H·head_dim·T: QKᵀ and attention·V over T keys,
        3 passes × 2 FLOPs × 2 matmuls, not halved for the causal mask (the usual convention).
        """
        tied_head = self.vocab_size * self.dim if self.tie_embeddings else 0
        matmul = self.num_params(embeddings=False, active=True) + tied_head
        return 6 * matmul + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


def is_hidden(name: str) -> bool:
    """Whether parameter `name` is one of μP's hidden matrices (names survive FSDP2, compile and checkpoints)."""
    return any(part in name for part in HIDDEN_MATRICES)


def attention_kernel(attention: str, device: torch.device) -> str:
    """The kernel `attention` ('auto', 'sdpa' or 'flex') means on `device`: 'auto' is flex on CUDA, sdpa elsewhere."""
    if attention == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return attention


def initial_value(name: str, shape, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The initial value of parameter `name`: drawn from a generator seeded by (seed, name), so it is the same
    whatever the init order, device count or sharding. Under μP a hidden matrix's std is divided by sqrt(m)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, device="cpu")
    std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if name.endswith(RESIDUAL_OUTPUTS) else cfg.init_std
    if is_hidden(name):
        std /= math.sqrt(cfg.width_mult)
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "big") & (2**63 - 1))
    return torch.randn(shape, generator=generator, device="cpu") * std  # on the CPU: the same bits on any device


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.type_as(x)


def rope_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) in fp32, computed exactly as transformers does (default or "llama3")."""
    exponents = torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float32) / cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** exponents
    if not cfg.rope_scaling:
        return inv_freq
    factor, low, high, context = (cfg.rope_scaling, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                                  cfg.rope_original_max_seq_len)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim) in fp32, Hugging Face's half-split layout."""
    positions = torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, rope_frequencies(cfg, device))  # (max_seq_len, head_dim / 2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


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


@functools.cache
def _compiled(fn):
    """`fn` compiled once per process: eager FlexAttention is a slow reference, and a compiled create_block_mask
    never builds the (T, T) mask in memory."""
    return torch.compile(fn)


def flex(q, k, v, block_mask: BlockMask, gqa: bool) -> torch.Tensor:
    """FlexAttention, compiled (on CPU it has a forward only: training there uses SDPA)."""
    return _compiled(flex_attention)(q, k, v, block_mask=block_mask, enable_gqa=gqa)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w2(F.silu(self.w1(x)) * self.w3(x)), x.new_zeros((), dtype=torch.float32)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (softmax gates renormalised over the chosen k) with a load-balancing loss.

    The N·k routed (token, slot) pairs are sorted by expert into one buffer in which each expert's group starts on a
    multiple of `align` rows (zero rows pad each group). The buffer's length is a function of N alone, so no shape
    depends on the routing: no host sync, and torch.compile traces the layer as one graph. Experts are stacked
    (E, …) tensors, split per expert in Hugging Face export. The groups are multiplied by one of two kernels:

    - bf16 weights with dim and hidden multiples of 8 (the GPU setting, `parallel.mixed_precision=bf16`):
      `torch._grouped_mm`, one grouped GEMM per projection, groups aligned to 8 rows (16 bytes, which its
      weight-gradient GEMM needs). On Hopper/Blackwell GPUs that is torch's CUTLASS kernel, reading the group offsets
      on the device; elsewhere torch loops over the groups itself (on a CPU freely, on an older GPU after copying
      the offsets to the host).
    - anything else (fp32: torch's grouped GEMM is bf16-only under torch.compile and on the GPU): blocks of
      align = ⌈N·k / E⌉ rows, each within one expert's group, in one batched matmul against each block's expert
      weights, gathered. At most 2E - 1 blocks: the zero padding at most doubles the experts' FLOPs, and the
      gathered weights are at most twice the layer's expert weights (on 2 CPU cores this layer is 2-3x slower than
      a per-expert loop; it is the kernel that compiles).

    Either way every gather, scatter and matmul (and its backward) touches O(N·k) rows: cost O(tokens · top_k),
    never O(tokens · n_experts).
    """

    GROUPED_MM_ALIGN = 8
    """Rows per expert group with torch._grouped_mm: 8 bf16 values are 16 bytes, the alignment its weight-gradient
    GEMM needs where the groups split the token dim."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.hidden = cfg.n_experts, cfg.top_k, cfg.hidden
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts_w13 = nn.Parameter(torch.empty(cfg.n_experts, 2 * cfg.hidden, cfg.dim))  # gate ‖ up
        self.experts_w2 = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim, cfg.hidden))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        flat = x.reshape(-1, D)  # (N, D)
        probs = F.softmax(self.gate(flat).float(), dim=-1)  # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        order = experts.flatten().argsort(stable=True)  # (N·k,) routed slots, grouped by expert
        token = order // self.top_k  # (N·k,) the token of each routed slot
        y = self.run_experts(flat[token], experts.flatten()[order])  # (N·k, D)
        y = y * weights.flatten()[order, None]
        out = torch.zeros_like(flat).index_add(0, token, y.type_as(flat))  # sum each token's k expert outputs
        return out.view(B, T, D), self.balance_loss(probs, experts)

    def uses_grouped_mm(self) -> bool:
        """Whether the experts run on torch._grouped_mm (see the class docstring)."""
        return (self.experts_w13.dtype == torch.bfloat16 and self.hidden % self.GROUPED_MM_ALIGN == 0
                and self.experts_w13.shape[-1] % self.GROUPED_MM_ALIGN == 0)

    def run_experts(self, xs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """SwiGLU of each row of xs (S, D) by the expert it was routed to, `expert` (S,), ascending."""
        S, E = xs.shape[0], self.n_experts
        grouped = self.uses_grouped_mm()
        align = self.GROUPED_MM_ALIGN if grouped else -(-S // E)
        rows = (S + E * (align - 1)) // align * align  # holds every group padded to a multiple of align
        first = torch.searchsorted(expert, torch.arange(E + 1, device=expert.device))  # (E + 1,) group bounds
        counts = first.diff()  # (E,) routed rows per expert
        padded = (counts + align - 1) // align * align
        ends = padded.cumsum(0)  # (E,) end of each padded group in the buffer
        pos = torch.arange(S, device=xs.device) + (ends - padded - first[:-1])[expert]  # (S,) each row's place
        buffer = xs.new_zeros(rows, xs.shape[1]).index_copy(0, pos, xs)  # (rows, D)
        if grouped:  # the last group runs to the buffer's end: torch leaves a row outside every group unwritten
            offs = torch.cat([ends[:-1], ends.new_full((1,), rows)]).to(torch.int32)
            matmul = functools.partial(self.grouped_matmul, offs=offs)
        else:  # the block starting at row b·align is the expert whose group holds that row (the last for spare ones)
            starts = torch.arange(0, rows, align, device=xs.device)
            matmul = functools.partial(self.block_matmul, block_expert=torch.searchsorted(ends, starts, right=True)
                                       .clamp(max=E - 1), align=align)
        gate, up = matmul(buffer, self.experts_w13).chunk(2, dim=-1)  # (rows, H) each
        return matmul(F.silu(gate) * up, self.experts_w2)[pos]  # (S, D)

    @staticmethod
    def grouped_matmul(x: torch.Tensor, w: torch.Tensor, *, offs: torch.Tensor) -> torch.Tensor:
        """x (rows, in) by stacked w (E, out, in): rows before offs[0] by w[0], then up to offs[1] by w[1], …"""
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)  # (rows, out)

    @staticmethod
    def block_matmul(x: torch.Tensor, w: torch.Tensor, *, block_expert: torch.Tensor, align: int) -> torch.Tensor:
        """x (rows, in) by stacked w (E, out, in): block b, rows [b·align, (b+1)·align), by w[block_expert[b]]."""
        blocks = x.view(-1, align, x.shape[-1])  # (rows / align, align, in)
        return torch.bmm(blocks, w[block_expert].transpose(1, 2)).flatten(0, 1)  # (rows, out)

    def balance_loss(self, probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Switch/Mixtral loss E · Σ_e f_e · P_e: f_e share of routed slots, P_e mean router probability."""
        routed = F.one_hot(experts, self.n_experts).float().mean(dim=(0, 1))  # (E,)
        return self.n_experts * (routed * probs.mean(dim=0)).sum()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoE(cfg) if cfg.n_experts else FeedForward(cfg.dim, cfg.hidden)

    def forward(self, x, cos, sin, cache: KVCache | None = None, start: int = 0,
                mask: torch.Tensor | BlockMask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, self.layer, start, mask)  # (B, T, D)
        ffn, aux = self.feed_forward(self.ffn_norm(h))
        return h + ffn, aux


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_buffers(self) -> None:
        """Recompute the RoPE tables (after `to_empty()` they hold garbage)."""
        self.rope_cos, self.rope_sin = rope_tables(self.cfg, device=self.tok_embeddings.weight.device)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Standard init, one seeded generator per parameter (see `initial_value`)."""
        for name, param in self.named_parameters():
            param.copy_(initial_value(name, param.shape, self.cfg, seed))
        self.init_buffers()

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T) → (logits (B, T, vocab), MoE load-balancing loss averaged over blocks (0 if dense)).

        With `cache`, tokens sit at positions start..start+T-1 and their keys/values are stored for later steps.
        With `segments` (B, T), a row holds several examples (a run of equal ids each): positions restart at each
        example and attention never crosses one, so each example computes what it would alone.
        """
        h = self.tok_embeddings(tokens)  # (B, T, D)
        T = tokens.shape[1]
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        mask = None
        if segments is not None:
            positions = positions_in_segments(segments)  # (B, T)
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B, 1, T, hd)
            mask = block_causal_mask(segments, flex=attention_kernel(self.cfg.attention, segments.device) == "flex")
        aux = torch.zeros((), device=h.device, dtype=torch.float32)
        for block in self.layers:
            h, block_aux = block(h, cos, sin, cache, start, mask)
            aux = aux + block_aux
        h = self.norm(h)
        logits = self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)
        if self.cfg.mup_base_dim:
            logits = logits / self.cfg.width_mult  # μP: the head's fan-in grows with width, its logits must not
        return logits, aux / len(self.layers)

    def new_cache(self, max_len: int) -> KVCache:
        """An empty KV cache for up to `max_len` positions (any batch size)."""
        return KVCache(self.cfg.n_layers, max_len)


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
