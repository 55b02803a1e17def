"""The model: exact logits parity with transformers' Llama/Mixtral, KV-cache generation, MoE routing, init."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainer.model.config import ModelConfig, initial_value
from trainer.model.generation import generate
from trainer.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
from trainer.hf import export  # noqa: E402

torch.set_num_threads(2)
BASE = dict(vocab_size=211, dim=64, n_layers=2, n_heads=4, max_seq_len=64, ffn_hidden=96)


def build(seed=0, **overrides) -> Transformer:
    model = Transformer(ModelConfig(**{**BASE, **overrides}))
    model.init_weights(seed)
    return model.eval()


def hf_copy(model: Transformer, folder):
    """transformers' own model class loaded from `model`'s weights, written as a Hugging Face folder."""
    export(model.state_dict(), model.cfg, str(folder))
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def max_logit_diff(model: Transformer, folder) -> float:
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    hf = hf_copy(model, folder)
    assert type(hf).__name__ == ("MixtralForCausalLM" if model.cfg.n_experts else "LlamaForCausalLM")
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == model.cfg.tie_embeddings
    with torch.no_grad():
        ours, _ = model(tokens)
        theirs = hf(tokens).logits
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("overrides", [
    dict(n_kv_heads=2, tie_embeddings=False, rope_theta=10000.0),
    dict(n_kv_heads=0, tie_embeddings=True, rope_theta=500000.0),
    dict(n_kv_heads=1, tie_embeddings=True, rope_theta=10000.0),
    dict(n_kv_heads=4, tie_embeddings=False, rope_theta=500000.0),
    dict(n_kv_heads=2, tie_embeddings=True, rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0,
         rope_original_max_seq_len=16),
], ids=["gqa-untied-1e4", "mha-tied-5e5", "mqa-tied-1e4", "mha-untied-5e5", "gqa-tied-llama3-scaled"])
def test_logits_match_llama(overrides, tmp_path):
    assert max_logit_diff(build(**overrides), tmp_path) <= 1e-4


@pytest.mark.parametrize("preset", ["moe", "demo"])
def test_logits_match_for_preset_shaped_blocks(preset, tmp_path):
    """A preset's block shape (width, heads, GQA, FFN, experts/top-k, tying), with 2 layers and a small vocabulary."""
    from raylm.config import load_config
    from trainer.size import SizeConfig

    cfg = load_config(SizeConfig, f"configs/{preset}.toml", ["--model.n_layers=2", "--model.vocab_size=256",
                                                             "--model.max_seq_len=64"], partial=True).model
    model = Transformer(cfg)
    model.init_weights(3)
    assert max_logit_diff(model.eval(), tmp_path) <= 1e-4


@pytest.mark.parametrize("overrides", [dict(n_kv_heads=2), dict(n_experts=4, top_k=2)], ids=["dense", "moe"])
def test_kv_cache_generation_equals_full_forward_argmax(overrides):
    model = build(**overrides)
    prompt = [5, 17, 42, 8, 99]
    cached = generate(model, prompt, max_new_tokens=20)
    uncached = generate(model, prompt, max_new_tokens=20, use_cache=False)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert cached == uncached == ids and len(ids) == 25


def test_sampling_is_seeded_and_respects_top_k():
    model = build()
    def sample(seed):
        return generate(model, [1, 2, 3], 15, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(seed))
    assert sample(0) == sample(0) != sample(1)
    assert generate(model, [1, 2, 3], 10, temperature=1.0, top_p=1e-9) == generate(model, [1, 2, 3], 10)


def test_moe_aux_loss_reaches_the_router():
    model = build(n_experts=4, top_k=2).train()
    logits, aux = model(torch.randint(0, 211, (2, 16)))
    assert aux.item() > 0
    aux.backward()
    router = model.layers[0].feed_forward.gate.weight.grad
    assert router is not None and router.abs().sum() > 0


def test_moe_flops_scale_with_top_k_not_experts():
    """Counted by torch's FlopCounterMode: experts cost 2·N·k·3·D·H (plus the router's 2·N·D·E), whatever E is, up to
    the fp32 kernel's zero padding of each expert's group, which at most doubles it (trainer/model/ MoE)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(4, 32, 64)
    for n_experts, top_k in [(4, 1), (16, 1), (16, 2), (64, 2)]:
        moe = build(n_experts=n_experts, top_k=top_k).layers[0].feed_forward
        with FlopCounterMode(display=False) as counter:
            moe(x)
        n, d, h = 4 * 32, 64, 96
        routed = 2 * n * top_k * 3 * d * h
        assert routed <= counter.get_total_flops() - 2 * n * d * n_experts < 2 * routed


def test_init_is_seeded_per_parameter_and_scaled():
    a, b, c = build(seed=0), build(seed=0), build(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not torch.equal(sa["layers.0.attention.wq.weight"], sc["layers.0.attention.wq.weight"])
    wo, wq = sa["layers.1.attention.wo.weight"], sa["layers.1.attention.wq.weight"]
    assert abs(wq.std().item() - 0.02) < 0.003 and abs(wo.std().item() - 0.02 / 2) < 0.002
    assert torch.equal(sa["norm.weight"], torch.ones(64))
    assert torch.equal(initial_value("layers.0.attention.wq.weight", (64, 64), a.cfg, 0), sa["layers.0.attention.wq.weight"])


def test_meta_build_then_materialise_equals_eager():
    with torch.device("meta"):
        model = Transformer(ModelConfig(**BASE))
    model.to_empty(device="cpu")
    model.init_weights(0)
    eager = build(seed=0)
    tokens = torch.randint(0, 211, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], eager(tokens)[0])


def test_param_and_flop_counts():
    cfg = ModelConfig(**BASE, n_kv_heads=2)
    model = Transformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert cfg.num_params(embeddings=False) == cfg.num_params() - 211 * 64
    moe = ModelConfig(**BASE, n_experts=8, top_k=2)
    assert moe.num_params() == sum(p.numel() for p in Transformer(moe).parameters())
    assert moe.num_params(active=True) == moe.num_params() - 2 * 6 * 3 * 64 * 96
    assert cfg.flops_per_token(seq_len=64) == 6 * cfg.num_params(embeddings=False) + 12 * 2 * 4 * 16 * 64


def test_kv_cache_keeps_per_token_work_flat_in_prompt_length():
    """Counted, not timed: FLOPs of the forward that produces one new token, after a short and a long prompt."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(n_kv_heads=2)

    def step_flops(prompt_len: int, use_cache: bool) -> int:
        ids = torch.randint(0, 211, (1, prompt_len))
        cache = model.new_cache(prompt_len + 1) if use_cache else None
        with torch.no_grad():
            model(ids, cache, 0)
            with FlopCounterMode(display=False) as counter:
                if use_cache:
                    model(ids[:, -1:], cache, prompt_len)
                else:
                    model(torch.cat([ids, ids[:, -1:]], dim=1))
        return counter.get_total_flops()

    cached = step_flops(8, True), step_flops(56, True)
    full = step_flops(8, False), step_flops(56, False)
    assert cached[1] / cached[0] < 1.2  # only attention over the longer cache grows
    assert full[1] / full[0] > 5  # the whole model re-runs over 57 positions instead of 9


def test_kv_cache_takes_the_compute_dtype_under_mixed_precision():
    """FSDP's bf16 policy computes in bf16 over fp32 parameters; autocast reproduces that without a process group.
    The cache holds bf16 keys and values (not fp32 copies of bf16 ones), and greedy decoding through it gives, token
    for token, what full bf16 forwards over the growing sequence give (the decode is no one repeated token, which a
    cache that fed the wrong keys could also give)."""
    model = build(n_kv_heads=2)
    prompt = [5, 17, 42]
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        cached = generate(model, prompt, max_new_tokens=20)
        ids = list(prompt)
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
        cache = model.new_cache(len(prompt))
        model(torch.tensor([prompt]), cache, 0)
    assert cached == ids and len(set(ids[len(prompt):])) > 1  # steps' logits differ by <= 0.002, top-2 by >= 0.012
    assert {t.dtype for t in cache.k + cache.v} == {torch.bfloat16}


def test_llama3_8b_preset_has_llama3_8b_parameter_count_and_size_cli_reports_it():
    from helpers import run_captured
    from trainer import size

    code, out, err = run_captured(size.main, ["--config", "configs/llama3-8b.toml"])
    assert code == 0, err
    assert "8,030.3M total" in out  # Meta's Llama-3-8B: 8,030,261,248 parameters
    code, out, _ = run_captured(size.main, ["--config", "configs/moe.toml", "--model.top_k=1", "--seq_len", "512"])
    assert "active per token (top-1 of 8 experts)" in out and "at seq_len 512" in out
    code, _, err = run_captured(size.main, ["--config", "configs/moe.toml", "--model.top_k=9"])
    assert code == 2 and err == "error: model.top_k=9 must be in [1, n_experts]\n"


@pytest.mark.parametrize("scaling", [
    dict(rope_scaling="linear", rope_factor=4.0),
    dict(rope_scaling="llama3", rope_factor=4.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0),
    dict(rope_scaling="yarn", rope_factor=4.0),
    dict(rope_scaling="yarn", rope_factor=8.0, rope_beta_fast=16.0, rope_beta_slow=2.0, rope_attention_factor=1.1),
], ids=["linear", "llama3", "yarn", "yarn-custom"])
def test_rope_scaling_matches_transformers_beyond_the_original_context(scaling, tmp_path):
    """Each kind of RoPE scaling gives transformers' logits (to 1e-5) at every position of a sequence 4x the original
    context, through the export (config.json's rope_parameters) and back through the import (the same ModelConfig)."""
    from trainer.hf import model_config_from_hf, read_config

    model = build(n_kv_heads=2, rope_theta=10000.0, rope_original_max_seq_len=16, max_seq_len=64, **scaling)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    hf = hf_copy(model, tmp_path)
    with torch.no_grad():
        ours, _ = model(tokens)
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    kind = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["rope_type"]
    assert kind == scaling["rope_scaling"]
    assert model_config_from_hf(read_config(str(tmp_path)), str(tmp_path), rest=model.cfg) == model.cfg


def test_a_checkpoint_config_from_before_the_rope_kinds_reads_as_llama3():
    assert ModelConfig(rope_scaling=8.0).rope_scaling == "llama3" and ModelConfig(rope_scaling=8.0).rope_factor == 8.0
    assert ModelConfig(rope_scaling=0.0).rope_scaling == "none"


def test_document_masking_gives_each_document_of_a_packed_row_the_logits_it_has_alone():
    """model.doc_mask: a pretraining row of EOS-ended documents computes, for each document, the logits of that
    document alone (to 1e-5): positions restart and attention stays inside it. Without it the later documents
    attend to the earlier ones."""
    g = torch.Generator().manual_seed(0)
    eos = 3
    docs = [torch.cat([torch.randint(4, 211, (n,), generator=g), torch.tensor([eos])]) for n in (6, 11, 8)]
    row = torch.cat(docs)[None]
    for doc_mask in (True, False):
        model = build(doc_mask=doc_mask, eos_id=eos)
        with torch.no_grad():
            packed, _ = model(row)
            starts = [0, len(docs[0]), len(docs[0]) + len(docs[1])]
            diffs = [(packed[0, s:s + len(d)] - model(d[None])[0][0]).abs().max().item() for s, d in zip(starts, docs)]
        if doc_mask:
            assert max(diffs) <= 1e-5
        else:
            assert diffs[0] <= 1e-5 and min(diffs[1:]) > 1e-3


def test_a_yarn_config_in_deepseeks_mscale_form_imports_as_its_attention_factor(tmp_path):
    """YaRN's attention factor given as mscale / mscale_all_dim (DeepSeek's config.json form): transformers
    computes it from them, raylm's import turns them into rope_attention_factor, and the logits agree to 1e-5."""
    from trainer.hf import model_config_from_hf, read_config

    model = build(n_kv_heads=2, rope_original_max_seq_len=16, max_seq_len=64, rope_scaling="yarn", rope_factor=4.0)
    hf_copy(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] |= {"mscale": 1.0, "mscale_all_dim": 0.5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    cfg = model_config_from_hf(read_config(str(tmp_path)), str(tmp_path), rest=model.cfg)
    assert cfg.rope_attention_factor == pytest.approx((0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1))
    imported = Transformer(cfg)
    imported.load_state_dict(model.state_dict())
    imported.eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (imported(tokens)[0] - hf(tokens).logits).abs().max().item() <= 1e-5
