"""Writing a Hugging Face folder that `AutoModelForCausalLM` / `AutoTokenizer` load with no custom code:
config.json, generation_config.json, safetensors and the tokenizer.

Weights go straight from the state dict to safetensors: no transformers model is ever instantiated, so an 8B export
needs one copy of the weights in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from trainer.hf.config import hf_config, require_transformers
from trainer.hf.names import to_hf_state_dict
from trainer.model.config import ModelConfig


def write_tokenizer(tokenizer, out_dir: str, *, max_len: int) -> None:
    """Write the tokenizer so transformers' AutoTokenizer reads text as raylm encodes it and `apply_chat_template`
    gives raylm's chat ids. A Hugging Face tokenizer is written as it came. A SentencePiece one gets the configs
    of a LlamaTokenizer: no dummy prefix, no BOS/EOS added. Without a chat template, `<s>`-like text in a document
    stays text, as raylm encodes it. With one (raylm's markers), the export behaves as every chat model does: the
    markers are special tokens, matched in the rendered template and left out by `decode(skip_special_tokens=True)`,
    so special tokens' text typed into a prompt is matched too (raylm's own encode keeps it text, and refuses it in
    chat data)."""
    from raylm.tokenizer import CHAT_MARKERS, write_tokenizer_files

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
    tf = require_transformers()
    from huggingface_hub import save_torch_state_dict

    os.makedirs(out_dir, exist_ok=True)
    bos, eos = 1, [2]  # raylm's SentencePiece ids when no tokenizer is shipped
    if tokenizer is not None:
        from raylm.chat_template import reply_end
        from raylm.tokenizer import load_tokenizer

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
