"""raylm ⇄ Hugging Face parameter names, and the one place that knows how MoE experts are laid out.

The tensors map 1:1 (same rotate-half RoPE layout, so q/k need no permutation); only names differ, and MoE experts
are stored per expert (`block_sparse_moe.experts.{e}.w1/w2/w3`, the layout of published Mixtral checkpoints and of
transformers' own `save_pretrained`) while raylm keeps them stacked. `hf_blocks` says which Hugging Face tensors make
up a raylm parameter: export splits a parameter by it (`to_hf_state_dict`), import reads it back by it
(`trainer.hf.load`), so the two cannot disagree.
"""

from __future__ import annotations

import math
import re

import torch

_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.gate.weight": "block_sparse_moe.gate.weight",
}
_RAYLM_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def hf_blocks(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The Hugging Face tensors (name, shape) whose concatenation along dim 0 is raylm parameter `name` with its
    leading dims merged: a stacked (E, 2H, D) experts_w13 is w1 (gate) then w3 (up) of expert 0, of expert 1, …;
    (E, D, H) experts_w2 is each expert's w2; any other parameter is one tensor of its own shape."""
    if name in _TOP:
        return [(_TOP[name], shape)]
    layer, rest = _RAYLM_LAYER.match(name).groups()
    experts = f"model.layers.{layer}.block_sparse_moe.experts"
    if rest == "feed_forward.experts_w13":
        return [(f"{experts}.{e}.{w}.weight", (shape[1] // 2, shape[2])) for e in range(shape[0]) for w in ("w1", "w3")]
    if rest == "feed_forward.experts_w2":
        return [(f"{experts}.{e}.w2.weight", shape[1:]) for e in range(shape[0])]
    return [(f"model.layers.{layer}.{_LAYER[rest]}", shape)]


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """raylm names → Hugging Face checkpoint names, each parameter split into its `hf_blocks`."""
    out = {}
    for name, value in state.items():
        blocks = hf_blocks(name, tuple(value.shape))
        if len(blocks) == 1:
            out[blocks[0][0]] = value
            continue
        rows = value.reshape(-1, value.shape[-1])
        parts = rows.split([math.prod(shape[:-1]) for _, shape in blocks])
        # copies, not views: safetensors rejects tensors that share memory
        out.update((block, part.reshape(shape).clone()) for (block, shape), part in zip(blocks, parts))
    return out
