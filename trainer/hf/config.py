"""raylm ⇄ Hugging Face folders: Llama for dense models, Mixtral for MoE.

The tensors map 1:1 (same rotate-half RoPE layout, so q/k need no permutation); only names differ, and MoE experts
are stored per expert (`block_sparse_moe.experts.{e}.w1/w2/w3`, the layout of published Mixtral checkpoints and of
transformers' own `save_pretrained`) while raylm keeps them stacked. Export writes config.json, generation_config.json,
safetensors and the SentencePiece tokenizer, which `AutoModelForCausalLM` / `AutoTokenizer` load with no custom code.
Import reads such a folder (e.g. a published Llama) into a ModelConfig and a raylm state dict, to continue pretraining.
Weights go straight between safetensors and state dicts: no transformers model is ever instantiated, so an 8B export
needs one copy of the weights in memory. `transformers` is needed for the config classes (`pip install raylm[hf]`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import torch

from raylm import storage
from raylm.errors import ConfigError, DataError
from trainer.model import ModelConfig, Transformer

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
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_TOP_INV = {v: k for k, v in _TOP.items()}
_RAYLM_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
SUPPORTED = ("llama", "mixtral")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("Hugging Face export/import needs transformers: pip install 'raylm[hf]'") from None
    return transformers


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """raylm names → Hugging Face checkpoint names; stacked experts split into per-expert w1 (gate), w3 (up), w2."""
    out = {}
    for name, value in state.items():
        if name in _TOP:
            out[_TOP[name]] = value
            continue
        layer, rest = _RAYLM_LAYER.match(name).groups()
        prefix = f"model.layers.{layer}."
        # per-expert copies, not views: safetensors rejects tensors that share memory
        if rest == "feed_forward.experts_w13":  # (E, 2H, D): gate ‖ up
            for e, (w1, w3) in enumerate(t.chunk(2, dim=0) for t in value.unbind(0)):
                out[f"{prefix}block_sparse_moe.experts.{e}.w1.weight"] = w1.clone()
                out[f"{prefix}block_sparse_moe.experts.{e}.w3.weight"] = w3.clone()
        elif rest == "feed_forward.experts_w2":  # (E, D, H)
            for e, w2 in enumerate(value.unbind(0)):
                out[f"{prefix}block_sparse_moe.experts.{e}.w2.weight"] = w2.clone()
        else:
            out[prefix + _LAYER[rest]] = value
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face checkpoint names → raylm names, per-expert weights stacked (inverse of `to_hf_state_dict`)."""
    out, experts = {}, {}
    for name, value in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # some tied checkpoints store the shared tensor twice
        match = _HF_LAYER.match(name)
        expert = match and _HF_EXPERT.match(match.group(2))
        if name in _TOP_INV:
            out[_TOP_INV[name]] = value
        elif expert:
            experts[(int(match.group(1)), int(expert.group(1)), expert.group(2))] = value
        elif match and match.group(2) in _LAYER_INV:
            out[f"layers.{match.group(1)}.{_LAYER_INV[match.group(2)]}"] = value
        else:
            raise DataError(f"unexpected Hugging Face weight {name!r}; only Llama and Mixtral checkpoints can be imported")
    for layer in range(cfg.n_layers if experts else 0):
        def stack(w: str) -> torch.Tensor:
            return torch.stack([experts.pop((layer, e, w)) for e in range(cfg.n_experts)])
        out[f"layers.{layer}.feed_forward.experts_w13"] = torch.cat([stack("w1"), stack("w3")], dim=1)
        out[f"layers.{layer}.feed_forward.experts_w2"] = stack("w2")
    return out


def check_state(state: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> None:
    """DataError unless `state` has exactly the names and shapes of a raylm model with `cfg`."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise DataError(f"{where}: weights do not match its config.json (first differences: {diff})")


def hf_config(cfg: ModelConfig, *, bos_id: int = 1, eos_id: int = 2, dtype: torch.dtype = torch.float32):
    """The transformers config for `cfg`: LlamaConfig, or MixtralConfig when it has experts."""
    tf = _transformers()
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
    """transformers' `rope_parameters` for raylm's RoPE: "default", or "llama3" frequency scaling."""
    if not cfg.rope_scaling:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": cfg.rope_scaling,
            "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len}


def rope_fields(rope: dict) -> dict:
    """The ModelConfig RoPE fields for transformers' `rope_parameters` (inverse of `rope_parameters`)."""
    fields = {"rope_theta": float(rope["rope_theta"]), "rope_scaling": 0.0}
    if rope.get("rope_type", "default") == "llama3":
        fields.update(rope_scaling=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))
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
    return _transformers().AutoConfig.for_model(**data)


def model_config_from_hf(hf, where: str, *, rest: ModelConfig | None = None) -> ModelConfig:
    """A ModelConfig computing the same function as a transformers Llama/Mixtral config, or a DataError saying why
    there is none. The fields the HF config does not determine (training-only ones such as init_std) come from
    `rest`, else are the defaults."""
    check_model_type(hf.model_type, where)
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": getattr(hf, "rope_theta", 10000.0)}
    unsupported = {
        "rope_type": (rope.get("rope_type"), rope.get("rope_type", "default") not in ("default", "llama3")),
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
                            f"default or llama3 RoPE, SiLU, no biases)")
    fields = dict(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers, n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads or 0, ffn_hidden=hf.intermediate_size, norm_eps=hf.rms_norm_eps,
        max_seq_len=hf.max_position_embeddings, **rope_fields(rope),
        tie_embeddings=bool(hf.tie_word_embeddings), n_experts=getattr(hf, "num_local_experts", 0),
        top_k=getattr(hf, "num_experts_per_tok", 2), aux_loss_weight=getattr(hf, "router_aux_loss_coef", 0.01),
        mup_base_dim=0,  # a Hugging Face model computes the standard parametrisation's function
    )
    kept = {k: v for k, v in dataclasses.asdict(rest).items() if k not in fields} if rest else {}
    return ModelConfig(**kept, **fields)


def write_tokenizer(tokenizer, out_dir: str, *, max_len: int) -> None:
    """Write the tokenizer so transformers' AutoTokenizer reads text as raylm encodes it and `apply_chat_template`
    gives raylm's chat ids. A Hugging Face tokenizer is written as it came. A SentencePiece one gets the configs
    of a LlamaTokenizer: no dummy prefix, no BOS/EOS added. Without a chat template, `<s>`-like text in a document
    stays text, as raylm encodes it. With one (raylm's markers), the export behaves as every chat model does: the
    markers are special tokens, matched in the rendered template and left out by `decode(skip_special_tokens=True)`,
    so special tokens' text typed into a prompt is matched too (raylm's own encode keeps it text, and refuses it in
    chat data)."""
    from dataprep.tokenizer import CHAT_MARKERS, write_tokenizer_files

    write_tokenizer_files(tokenizer.files, out_dir)
    if tokenizer.kind == "huggingface":
        return
    sp = tokenizer.sp
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False, "legacy": False,
        "split_special_tokens": True,
        "bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()),
        "model_max_length": max_len, "clean_up_tokenization_spaces": False,
    }
    if tokenizer.chat_template:
        config.update(chat_template=tokenizer.chat_template, split_special_tokens=False, added_tokens_decoder={
            str(sp.piece_to_id(marker)): {"content": marker, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False} for marker in CHAT_MARKERS})
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def export(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str, *, tokenizer: dict[str, bytes] | None = None,
           dtype: torch.dtype = torch.float32) -> None:
    """Write a Hugging Face folder: config.json, generation_config.json, model.safetensors (sharded at 5 GB, with an
    index, like `save_pretrained`) and, if given, the tokenizer's files with its chat template. Generation stops at
    EOS and, for a chat model, at the token that ends a reply."""
    tf = _transformers()
    from huggingface_hub import save_torch_state_dict

    os.makedirs(out_dir, exist_ok=True)
    bos, eos = 1, [2]  # raylm's SentencePiece ids when no tokenizer is shipped
    if tokenizer is not None:
        from dataprep.chat import reply_end
        from dataprep.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
        bos, eos = tok.bos_id, [tok.eos_id]
        end = reply_end(tok) if tok.chat_template else tok.eos_id
        if end != tok.eos_id:
            eos.append(end)
        write_tokenizer(tok, out_dir, max_len=cfg.max_seq_len)
    state, cfg = standard_parametrisation(state, cfg)
    config = hf_config(cfg, bos_id=bos, eos_id=eos[0], dtype=dtype)
    config.save_pretrained(out_dir)
    generation = tf.GenerationConfig.from_model_config(config)
    generation.eos_token_id = eos if len(eos) > 1 else eos[0]
    generation.save_pretrained(out_dir)
    weights = {k: v.to(dtype) for k, v in to_hf_state_dict(state).items()}
    save_torch_state_dict(weights, out_dir, metadata={"format": "pt"})


def standard_parametrisation(state: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """The same function without μP's multiplier, so the exported model needs no custom code: the logits are linear
    in the final RMSNorm's gain, so the 1 / m folds into it (a tied embedding stays tied, no tensor is added)."""
    if not cfg.mup_base_dim:
        return state, cfg
    return {**state, "norm.weight": state["norm.weight"] / cfg.width_mult}, dataclasses.replace(cfg, mup_base_dim=0)


def read_safetensors(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder: model.safetensors, or the shards its index lists."""
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise DataError(f"{folder} has no model.safetensors (or index); only safetensors checkpoints can be imported")
    return {k: v for name in files for k, v in load_file(os.path.join(folder, name)).items()}


def import_folder(folder: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, fp32 raylm state dict) from a Hugging Face Llama/Mixtral folder."""
    tf = _transformers()
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise DataError(not_a_folder(folder))
    cfg = model_config_from_hf(tf.AutoConfig.from_pretrained(folder), folder)
    try:
        state = from_hf_state_dict(read_safetensors(folder), cfg)
    except KeyError as missing:
        raise DataError(f"{folder}: expert weight {missing} is missing") from None
    check_state(state, cfg, folder)
    return cfg, {k: v.float() for k, v in state.items()}
