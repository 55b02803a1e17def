"""Export to a Hugging Face folder that transformers loads with no custom code, and import back."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_captured
from dataprep.tokenizer import encode_exact, load_tokenizer, train_tokenizer
from trainer.model import ModelConfig, Transformer, generate
from trainer.weights import Weights, load_weights, save_weights

transformers = pytest.importorskip("transformers")
from trainer import export as export_cli  # noqa: E402
from trainer import generate as generate_cli  # noqa: E402

TEXT = ["def add(a, b):\n\treturn a + b  # sum\n", "Hello, world! Καλημέρα κόσμε. 你好，世界 🎉\n",
        "    for i in range(10):\n        print(i)\n"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> bytes:
    lines = [l for t in TEXT * 40 for l in t.split("\n") if l]
    return train_tokenizer(lines, vocab_size=360, num_threads=1)


def weights_file(tmp_path, sp_model: bytes, **model) -> str:
    cfg = ModelConfig(vocab_size=load_tokenizer(sp_model).vocab_size(), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden=128, max_seq_len=128, **model)
    m = Transformer(cfg)
    m.init_weights(7)
    path = str(tmp_path / "w.pt")
    save_weights(path, Weights(cfg, m.state_dict(), sp_model))
    return path


@pytest.mark.parametrize("model", [dict(tie_embeddings=True), dict(n_experts=4, top_k=2)],
                         ids=["llama-tied", "mixtral"])
def test_export_loads_in_transformers_and_generates_the_same(tmp_path, sp_model, model):
    path = weights_file(tmp_path, sp_model, **model)
    out = tmp_path / "hf"
    code, stdout, err = run_captured(export_cli.main, ["--checkpoint", path, "--out", out])
    assert code == 0, err
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= files
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(hf).__name__ == ("MixtralForCausalLM" if model.get("n_experts") else "LlamaForCausalLM")
    ours = load_weights(path).model()
    prompt = encode_exact(load_tokenizer(sp_model), ["def add("])[0]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                         eos_token_id=None, pad_token_id=0)[0].tolist()
    assert generate(ours, prompt, 24) == theirs


def test_hf_tokenizer_matches_sentencepiece(tmp_path, sp_model):
    path = weights_file(tmp_path, sp_model)
    run_captured(export_cli.main, ["--checkpoint", path, "--out", tmp_path / "hf"])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = load_tokenizer(sp_model)
    for text in TEXT + ["  leading spaces", " 1234567 digits", "tabs\tand\nnewlines\n\n", "<s> and </s> are text"]:
        assert tok.encode(text, add_special_tokens=False) == encode_exact(sp, [text])[0], text
        assert tok.decode(encode_exact(sp, [text])[0]) == text
    # the one known difference: SentencePiece's space marker typed as text. raylm encodes it as its UTF-8 bytes so it
    # decodes back exactly; transformers' pipeline turns it into the space piece. Decoding raylm's ids stays exact.
    marker = "a\u2581b"
    assert tok.encode(marker, add_special_tokens=False) != encode_exact(sp, [marker])[0]
    assert tok.decode(encode_exact(sp, [marker])[0]) == marker


@pytest.mark.parametrize("model", [dict(), dict(n_experts=4, top_k=2), dict(tie_embeddings=True, rope_scaling=8.0)],
                         ids=["llama", "mixtral", "tied-llama3-rope"])
def test_import_of_export_is_identity(tmp_path, sp_model, model):
    path = weights_file(tmp_path, sp_model, **model)
    assert run_captured(export_cli.main, ["--checkpoint", path, "--out", tmp_path / "hf"])[0] == 0
    assert run_captured(export_cli.main, ["--from-hf", tmp_path / "hf", "--out", tmp_path / "back.pt"])[0] == 0
    before, after = load_weights(path), load_weights(str(tmp_path / "back.pt"))
    assert before.cfg == after.cfg and before.tokenizer == after.tokenizer
    assert before.state.keys() == after.state.keys()
    assert all(torch.equal(before.state[k], after.state[k]) for k in before.state)


def test_generate_cli_and_its_errors(tmp_path, sp_model):
    path = weights_file(tmp_path, sp_model)
    code, out, _ = run_captured(generate_cli.main, ["--checkpoint", path, "--prompt", "def ", "--max_new_tokens", "8"])
    assert code == 0 and out.startswith("def ")
    code, _, err = run_captured(generate_cli.main, ["--checkpoint", tmp_path / "nope.pt", "--prompt", "x"])
    assert code == 2 and err.strip() == (f"error: checkpoint {tmp_path / 'nope.pt'} does not exist; pass a run or "
                                         "checkpoint directory, a Hugging Face folder or a raylm .pt weights file")
    code, _, err = run_captured(generate_cli.main, ["--checkpoint", path, "--prompt", "x" * 400])
    assert code == 2 and err.startswith("error: --prompt is ") and "max_seq_len=128" in err
    code, _, err = run_captured(export_cli.main, ["--checkpoint", path, "--out", tmp_path / "o",
                                                  "--tokenizer", tmp_path / "no.model"])
    assert code == 2 and err.startswith(f"error: cannot read tokenizer {tmp_path / 'no.model'}")


def test_import_refuses_what_raylm_cannot_represent(tmp_path, sp_model):
    path = weights_file(tmp_path, sp_model)
    run_captured(export_cli.main, ["--checkpoint", path, "--out", tmp_path / "hf"])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    code, _, err = run_captured(export_cli.main, ["--from-hf", tmp_path / "hf", "--out", tmp_path / "w.pt"])
    assert code == 2 and "attention_bias=True is not supported" in err
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = run_captured(export_cli.main, ["--from-hf", tmp_path / "hf", "--out", tmp_path / "w.pt"])
    assert code == 2 and "model_type='gpt2'; raylm imports llama and mixtral models" in err
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    code, _, err = run_captured(export_cli.main, ["--from-hf", tmp_path / "hf", "--out", tmp_path / "w.pt"])
    assert code == 2 and "weights do not match its config.json" in err and err.count("\n") == 1


def test_bf16_export_loads_and_matches_rounded_weights(tmp_path, sp_model):
    path = weights_file(tmp_path, sp_model, n_experts=2, top_k=1)
    code, _, _ = run_captured(export_cli.main, ["--checkpoint", path, "--out", tmp_path / "hf", "--dtype", "bfloat16"])
    assert code == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16
    ours = load_weights(path).state["layers.1.feed_forward.experts_w13"].to(torch.bfloat16)
    assert torch.equal(hf.model.layers[1].mlp.experts.gate_up_proj, ours)


def test_import_of_a_sharded_folder_written_by_transformers(tmp_path, sp_model):
    """What a published checkpoint looks like: transformers' own save_pretrained, several shards and an index."""
    path = weights_file(tmp_path, sp_model, n_experts=4, top_k=2)
    run_captured(export_cli.main, ["--checkpoint", path, "--out", tmp_path / "hf"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "pub", max_shard_size="100KB")
    assert (tmp_path / "pub" / "model.safetensors.index.json").exists()
    before, after = load_weights(path), load_weights(str(tmp_path / "pub"))
    assert before.cfg == after.cfg and all(torch.equal(before.state[k], after.state[k]) for k in before.state)
