"""The decoder: embeddings, blocks of attention and SwiGLU or top-k MoE feed-forward under pre-RMSNorm, and the LM
head. Layouts follow Hugging Face (MoE experts stacked as (E, 2H, D) gate‖up and (E, D, H) down tensors), so weights
map 1:1 to `LlamaForCausalLM` / `MixtralForCausalLM` (`trainer/hf/`)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from trainer.model.attention import (Attention, KVCache, attention_kernel, block_causal_mask, positions_in_segments,
                                     rope_tables)
from trainer.model.config import ModelConfig, initial_value


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.type_as(x)


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


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) index of each token's document in its row: the count of EOS tokens before it (an EOS belongs to the
    document it ends)."""
    ends = (tokens == eos_id).int()
    return ends.cumsum(dim=1) - ends


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
        example and attention never crosses one, so each example computes what it would alone. With model.doc_mask
        a pretraining row's documents are its segments (`document_ids`).
        """
        h = self.tok_embeddings(tokens)  # (B, T, D)
        T = tokens.shape[1]
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        mask = None
        if segments is None and self.cfg.doc_mask and cache is None:
            segments = document_ids(tokens, self.cfg.eos_id)
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
