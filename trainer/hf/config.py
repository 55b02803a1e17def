"""ModelConfig ⇄ a Hugging Face config.json: LlamaConfig for dense models, MixtralConfig for MoE.

`hf_config` writes the transformers config of a raylm model; `read_config` reads a folder's config.json (local or
s3://) and `model_config_from_hf` turns it into the ModelConfig computing the same function, or says why there is none.
`transformers` is needed for the config classes (`pip install raylm[hf]`).
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch

from raylm import storage
from raylm.errors import ConfigError, DataError
from trainer.model.config import ModelConfig

SUPPORTED = ("llama", "mixtral")


def require_transformers():
    """The transformers module, or a ConfigError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("Hugging Face export/import needs transformers: pip install 'raylm[hf]'") from None
    return transformers


def hf_config(cfg: ModelConfig, *, bos_id: int = 1, eos_id: int = 2, dtype: torch.dtype = torch.float32):
    """The transformers config for `cfg`: LlamaConfig, or MixtralConfig when it has experts."""
    tf = require_transformers()
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope_parameters(cfg), bos_token_id=bos_id,
        eos_token_id=eos_id, hidden_act="silu", dtype=dtype,
    )
    if cfg.n_experts:
        return tf.MixtralConfig(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                                router_aux_loss_coef=cfg.aux_loss_weight, **common)
    return tf.LlamaConfig(attention_bias=False, mlp_bias=False, **common)


def rope_parameters(cfg: ModelConfig) -> dict:
    """transformers' `rope_parameters` for raylm's RoPE: "default", "linear", "llama3" or "yarn"."""
    kind = "default" if cfg.rope_scaling == "none" else cfg.rope_scaling
    out = {"rope_type": kind, "rope_theta": cfg.rope_theta}
    if kind != "default":
        out["factor"] = cfg.rope_factor
    if kind == "llama3":
        out |= {"low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max_seq_len}
    if kind == "yarn":
        out |= {"original_max_position_embeddings": cfg.rope_original_max_seq_len, "beta_fast": cfg.rope_beta_fast,
                "beta_slow": cfg.rope_beta_slow, "truncate": True}
        if cfg.rope_attention_factor:
            out["attention_factor"] = cfg.rope_attention_factor
    return out


ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_fields(rope: dict, where: str, *, max_positions: int) -> dict:
    """The ModelConfig RoPE fields for transformers' `rope_parameters` (inverse of `rope_parameters`); YaRN's
    DeepSeek form (mscale and mscale_all_dim) becomes the attention factor it stands for."""
    kind = rope.get("rope_type", "default")
    fields = {"rope_theta": float(rope["rope_theta"]), "rope_scaling": "none" if kind == "default" else kind}
    if kind == "default":
        return fields
    original = rope.get("original_max_position_embeddings")
    factor = rope.get("factor") or max_positions / original
    fields["rope_factor"] = float(factor)
    if kind == "llama3":
        fields.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]), rope_original_max_seq_len=int(original))
    if kind == "yarn":
        if rope.get("truncate", True) is False:
            raise DataError(f"{where}: YaRN with truncate=false is not supported by raylm's model")
        attention = rope.get("attention_factor")
        if attention is None and rope.get("mscale") and rope.get("mscale_all_dim"):
            mscale = lambda m: 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0  # noqa: E731
            attention = mscale(rope["mscale"]) / mscale(rope["mscale_all_dim"])
        fields.update(rope_original_max_seq_len=int(original), rope_beta_fast=float(rope.get("beta_fast") or 32),
                      rope_beta_slow=float(rope.get("beta_slow") or 1), rope_attention_factor=float(attention or 0.0))
    return fields


def check_model_type(model_type, where: str) -> None:
    if model_type not in SUPPORTED:
        raise DataError(f"{where}: model_type={model_type!r}; raylm imports {' and '.join(SUPPORTED)} models")


def not_a_folder(folder: str) -> str:
    """Why `folder` (which has no config.json) cannot be read as a Hugging Face model: a path that does not exist,
    or a folder of something else."""
    if not storage.exists(folder):
        return f"{folder} does not exist; pass a Hugging Face model folder (config.json and safetensors)"
    return f"{folder} is not a Hugging Face model folder (no config.json)"


def read_config(folder: str):
    """The transformers config of a Hugging Face folder (local or s3://), made from its config.json alone."""
    path = storage.join(folder, "config.json")
    if not storage.exists(path):
        raise DataError(not_a_folder(folder))
    try:
        data = json.loads(storage.read_bytes(path))
    except ValueError:
        raise DataError(f"{path} is not valid JSON") from None
    check_model_type(data.get("model_type") if isinstance(data, dict) else None, folder)
    return require_transformers().AutoConfig.for_model(**data)


def model_config_from_hf(hf, where: str, *, rest: ModelConfig | None = None) -> ModelConfig:
    """A ModelConfig computing the same function as a transformers Llama/Mixtral config, or a DataError saying why
    there is none. The fields the HF config does not determine (training-only ones such as init_std) come from
    `rest`, else are the defaults."""
    check_model_type(hf.model_type, where)
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": getattr(hf, "rope_theta", 10000.0)}
    unsupported = {
        "rope_type": (rope.get("rope_type"), rope.get("rope_type", "default") not in ROPE_TYPES),
        "hidden_act": (hf.hidden_act, hf.hidden_act != "silu"),
        "attention_bias": (True, bool(getattr(hf, "attention_bias", False))),
        "mlp_bias": (True, bool(getattr(hf, "mlp_bias", False))),
        "head_dim": (getattr(hf, "head_dim", None), (getattr(hf, "head_dim", None) or 0) not in
                     (0, hf.hidden_size // hf.num_attention_heads)),
        "sliding_window": (getattr(hf, "sliding_window", None), getattr(hf, "sliding_window", None) is not None),
    }
    for key, (value, bad) in unsupported.items():
        if bad:
            raise DataError(f"{where}: {key}={value!r} is not supported by raylm's model (Llama/Mixtral with "
                            f"default, linear, llama3 or yarn RoPE, SiLU, no biases)")
    fields = dict(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers, n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads or 0, ffn_hidden=hf.intermediate_size, norm_eps=hf.rms_norm_eps,
        max_seq_len=hf.max_position_embeddings,
        **rope_fields(rope, where, max_positions=hf.max_position_embeddings),
        tie_embeddings=bool(hf.tie_word_embeddings), n_experts=getattr(hf, "num_local_experts", 0),
        top_k=getattr(hf, "num_experts_per_tok", 2), aux_loss_weight=getattr(hf, "router_aux_loss_coef", 0.01),
        mup_base_dim=0,  # a Hugging Face model computes the standard parametrisation's function
    )
    kept = {k: v for k, v in dataclasses.asdict(rest).items() if k not in fields} if rest else {}
    return ModelConfig(**kept, **fields)
