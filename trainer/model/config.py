"""The model's configuration and its μP init: which matrices are hidden (their init std and lr scale with width),
and each parameter's initial value, drawn from a generator seeded by its name so it is the same on any device count
or sharding. Imports only torch; `raylm.config` turns its ValueErrors into ConfigErrors."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch


RESIDUAL_OUTPUTS = ("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.experts_w2")


HIDDEN_MATRICES = ("attention.wq.", "attention.wk.", "attention.wv.", "attention.wo.", "feed_forward.w1.",
                   "feed_forward.w2.", "feed_forward.w3.", "feed_forward.experts_w13", "feed_forward.experts_w2",
                   "feed_forward.gate.")
"""μP's hidden matrices: every matrix whose fan-in grows with width except the LM head. The MoE router is one too:
its fan-out (the experts) is fixed, but its update grows with its fan-in as a hidden matrix's does, so it trains at
lr / m; it starts at std / √m like them (strict μP would give this output-like matrix std / m: at init the router's
logits are then larger by √m, a softer start the training lr does not depend on)."""


ATTENTION = ("auto", "sdpa", "flex")


ROPE_SCALING = ("none", "linear", "llama3", "yarn")
ROPE_FIELDS = ("rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
               "rope_original_max_seq_len", "rope_beta_fast", "rope_beta_slow", "rope_attention_factor")
"""How positions are rotated beyond rope_theta: chosen anew when a run extends another's context."""
NOT_IN_WEIGHTS = ("attention", "max_seq_len", "doc_mask", "eos_id", *ROPE_FIELDS)
"""ModelConfig fields that change no weight: the attention kernel, the RoPE table's length and its scaling, and
document masking. A checkpoint loads into a model that differs from it only in these (context extension changes the
RoPE ones)."""


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
    rope_scaling: str = "none"
    """RoPE frequency scaling for a longer context, computed as transformers computes it: 'none'; 'linear'
    (position interpolation: every frequency / rope_factor); 'llama3' (Llama 3.1: wavelengths beyond
    rope_original_max_seq_len / rope_low_freq_factor slowed by rope_factor, those below / rope_high_freq_factor kept,
    smooth between); 'yarn' (YaRN: interpolation for the dimensions that turn fewer than rope_beta_slow times within
    rope_original_max_seq_len, extrapolation above rope_beta_fast, a ramp between, and cos/sin scaled by
    rope_attention_factor). A number (a checkpoint from before the kinds: Llama 3.1's factor) reads as 'llama3'."""
    rope_factor: float = 1.0
    """How much longer the context is made (linear, llama3, yarn): 8 in Llama 3.1, 4 for 8K → 32K with YaRN."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths above rope_original_max_seq_len / this are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths below rope_original_max_seq_len / this are kept; smooth in between."""
    rope_original_max_seq_len: int = 8192
    """llama3, yarn: the context length the unscaled model was trained at."""
    rope_beta_fast: float = 32.0
    """yarn: dimensions turning more than this many times within the original context are extrapolated (kept)."""
    rope_beta_slow: float = 1.0
    """yarn: dimensions turning fewer than this many times within the original context are interpolated."""
    rope_attention_factor: float = 0.0
    """yarn: what cos and sin are multiplied by (0 = the paper's 0.1 · ln(rope_factor) + 1)."""
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
    doc_mask: bool = False
    """Pretraining rows: attention stays inside each document and positions restart at each (a document ends with
    its EOS, eos_id), as if each were alone; the loss and the data order are unchanged. Costs the dense-mask
    attention kernel on CPU (SDPA with a (T, T) mask instead of its causal kernel), FlexAttention's on CUDA."""
    eos_id: int = 2
    """The token that ends a document (doc_mask); the trainer sets it from the dataset's tokenizer."""
    attention: str = "auto"
    """Kernel for packed examples (chat data), where attention is block-causal: 'flex', FlexAttention's
    block-sparse kernel (compiled; it never builds a (T, T) mask), or 'sdpa' with a dense (T, T) boolean mask per
    row, which CUDA runs in its slow math kernel; 'auto' = flex on CUDA, sdpa elsewhere (FlexAttention has no
    backward on CPU). Plain causal attention always uses SDPA's causal kernel. Not part of the architecture: any
    value loads any weights."""

    def __post_init__(self):
        if isinstance(self.rope_scaling, (int, float)):  # a checkpoint's config from before the kinds
            factor = float(self.rope_scaling)
            self.rope_scaling, self.rope_factor = ("llama3", factor) if factor else ("none", self.rope_factor)
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
            (self.rope_scaling in ROPE_SCALING, "rope_scaling", self.rope_scaling,
             f"must be one of {', '.join(ROPE_SCALING)}"),
            (self.rope_factor >= 1, "rope_factor", self.rope_factor, "must be >= 1"),
            (self.rope_original_max_seq_len > 0, "rope_original_max_seq_len", self.rope_original_max_seq_len,
             "must be > 0"),
            (self.rope_beta_fast > self.rope_beta_slow > 0, "rope_beta_fast", self.rope_beta_fast,
             f"must be > rope_beta_slow={self.rope_beta_slow} > 0"),
            (self.rope_attention_factor >= 0, "rope_attention_factor", self.rope_attention_factor,
             "must be >= 0 (0 = YaRN's default)"),
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
