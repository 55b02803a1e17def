"""raylm ⇄ Hugging Face: Llama for dense models, Mixtral for MoE. Weights map 1:1 (same RoPE layout), names differ.

Export writes a folder that `AutoModelForCausalLM` / `AutoTokenizer` load with no custom code; import reads a Llama
(or Mixtral) folder back into a `ModelConfig` + raylm state dict, to continue pretraining a published checkpoint.
`transformers` is needed only here (`pip install transformers`).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from dataprep.errors import ConfigError, DataError
from trainer.model import ModelConfig

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
    "feed_forward.gate.weight": "mlp.gate.weight",
    "feed_forward.experts_w13": "mlp.experts.gate_up_proj",
    "feed_forward.experts_w2": "mlp.experts.down_proj",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("Hugging Face export/import needs transformers: pip install transformers") from None
    return transformers


def hf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    layer, rest = _LAYER_KEY.match(name).groups()
    return f"model.layers.{layer}.{_LAYER[rest]}"


def raylm_name(name: str) -> str:
    inverse_top = {v: k for k, v in _TOP.items()}
    if name in inverse_top:
        return inverse_top[name]
    match = _HF_LAYER_KEY.match(name)
    inverse = {v: k for k, v in _LAYER.items()}
    if not match or match.group(2) not in inverse:
        raise DataError(f"unexpected Hugging Face weight {name!r}; only Llama and Mixtral checkpoints can be imported")
    return f"layers.{match.group(1)}.{inverse[match.group(2)]}"


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {hf_name(k): v for k, v in state.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {raylm_name(k): v for k, v in state.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    return out


def hf_config(cfg: ModelConfig, *, bos_id: int = 1, eos_id: int = 2):
    """The transformers config object for `cfg`: LlamaConfig, or MixtralConfig when it has experts."""
    tf = _transformers()
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, bos_token_id=bos_id,
        eos_token_id=eos_id, hidden_act="silu", torch_dtype="float32",
    )
    if cfg.n_experts:
        return tf.MixtralConfig(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                                router_aux_loss_coef=cfg.aux_loss_weight, **common)
    return tf.LlamaConfig(attention_bias=False, mlp_bias=False, head_dim=cfg.head_dim, **common)


def model_config_from_hf(hf) -> ModelConfig:
    """A ModelConfig equivalent to a transformers Llama/Mixtral config."""
    rope = getattr(hf, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise DataError(f"RoPE scaling {rope.get('rope_type')!r} is not supported by raylm's model")
    return ModelConfig(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers, n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads, ffn_hidden=hf.intermediate_size, norm_eps=hf.rms_norm_eps,
        rope_theta=theta, max_seq_len=hf.max_position_embeddings, tie_embeddings=bool(hf.tie_word_embeddings),
        n_experts=getattr(hf, "num_local_experts", 0) or 0, top_k=getattr(hf, "num_experts_per_tok", 2) or 2,
    )


def hf_model(cfg: ModelConfig, state: dict[str, torch.Tensor]):
    """A transformers model holding raylm weights `state` (fp32, eval mode)."""
    tf = _transformers()
    config = hf_config(cfg)
    cls = tf.MixtralForCausalLM if cfg.n_experts else tf.LlamaForCausalLM
    model = cls(config)
    missing, unexpected = model.load_state_dict(to_hf_state_dict(state), strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        model.tie_weights()
    return model.eval()


def write_tokenizer(tokenizer_model: str, out_dir: str, *, bos_id: int, eos_id: int, max_len: int) -> None:
    """Copy the SentencePiece model and write the configs for transformers' LlamaTokenizer (sentencepiece-based,
    no dummy prefix, no BOS/EOS added: raylm's encoding)."""
    shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "sp_model_kwargs": {},
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def export(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str, *, tokenizer_model: str | None = None) -> None:
    """Write a Hugging Face folder: config.json, model.safetensors and (if given) the tokenizer."""
    os.makedirs(out_dir, exist_ok=True)
    hf_model(cfg, state).save_pretrained(out_dir, safe_serialization=True)
    if tokenizer_model:
        write_tokenizer(tokenizer_model, out_dir, bos_id=1, eos_id=2, max_len=cfg.max_seq_len)


def import_folder(folder: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, raylm state dict) from a Hugging Face Llama/Mixtral folder."""
    tf = _transformers()
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise DataError(f"{folder} is not a Hugging Face model folder (no config.json)")
    model = tf.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    cfg = model_config_from_hf(model.config)
    return cfg, from_hf_state_dict(model.state_dict(), cfg)
