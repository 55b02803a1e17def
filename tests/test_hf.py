"""Export to a Hugging Face folder that transformers loads with no custom code, and import back."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_captured
from raylm.tokenizer import encode_exact, load_tokenizer, train_tokenizer
from trainer.model.config import ModelConfig
from trainer.model.generation import generate
from trainer.model.transformer import Transformer
from trainer.weights import Weights, load_weights, save_weights

transformers = pytest.importorskip("transformers")
from trainer import export as export_cli, generate as generate_cli  # noqa: E402

TEXT = ["def add(a, b):\n\treturn a + b  # sum\n", "Hello, world! Καλημέρα κόσμε. 你好，世界 🎉\n",
        "    for i in range(10):\n        print(i)\n"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> bytes:
    lines = [l for t in TEXT * 40 for l in t.split("\n") if l]
    return train_tokenizer(lines, vocab_size=360, num_threads=1)


def weights_file(tmp_path, sp_model: bytes, **model) -> str:
    cfg = ModelConfig(vocab_size=load_tokenizer(sp_model).vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden=128, max_seq_len=128, **model)
    m = Transformer(cfg)
    m.init_weights(7)
    path = str(tmp_path / "w.pt")
    save_weights(path, Weights(cfg, m.state_dict(), {"tokenizer.model": sp_model}))
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
    prompt = load_tokenizer(sp_model).encode(["def add("])[0]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                         eos_token_id=None, pad_token_id=0)[0].tolist()
    assert generate(ours, prompt, 24) == theirs


@pytest.mark.parametrize("chat", [False, True], ids=["pretraining-tokenizer", "chat-tokenizer"])
def test_hf_tokenizer_matches_sentencepiece(tmp_path, sp_model, chat):
    """Text encodes and decodes as raylm does. A tokenizer without chat markers keeps `<s>` typed in a document as
    text; a chat export behaves as every chat model: its special tokens are matched in text (raylm's own encode
    keeps them text), so its template's markers are tokens and replies decode clean."""
    if not chat:
        import io

        import sentencepiece as spm

        from raylm.tokenizer import TRAINER_OPTIONS

        lines, model = [l for t in TEXT * 40 for l in t.split("\n") if l], io.BytesIO()
        options = {k: v for k, v in TRAINER_OPTIONS.items() if k != "control_symbols"}
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=360,
                                       num_threads=1, **options)
        sp_model = model.getvalue()
    path = weights_file(tmp_path, sp_model)
    run_captured(export_cli.main, ["--checkpoint", path, "--out", tmp_path / "hf"])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = load_tokenizer(sp_model).sp
    special = ["<s> and </s> are text"]
    for text in TEXT + ["  leading spaces", " 1234567 digits", "tabs\tand\nnewlines\n\n"] + ([] if chat else special):
        assert tok.encode(text, add_special_tokens=False) == encode_exact(sp, [text])[0], text
        assert tok.decode(encode_exact(sp, [text])[0]) == text
    if chat:
        assert tok.encode(special[0], add_special_tokens=False)[0] == sp.bos_id()
        assert tok.decode(encode_exact(sp, special)[0]) == special[0]
    # the one known difference: SentencePiece's space marker typed as text. raylm encodes it as its UTF-8 bytes so it
    # decodes back exactly; transformers' pipeline turns it into the space piece. Decoding raylm's ids stays exact.
    marker = "a\u2581b"
    assert tok.encode(marker, add_special_tokens=False) != encode_exact(sp, [marker])[0]
    assert tok.decode(encode_exact(sp, [marker])[0]) == marker


@pytest.mark.parametrize("model", [dict(), dict(n_experts=4, top_k=2), dict(tie_embeddings=True, rope_scaling="llama3", rope_factor=8.0)],
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
    assert code == 2 and err.startswith(f"error: --tokenizer {tmp_path / 'no.model'} does not exist")


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
    assert code == 2 and err == (f"error: {tmp_path / 'hf'} has no tensor model.layers.2.input_layernorm.weight, "
                                 "which a model of its config.json needs\n")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    code, _, err = run_captured(export_cli.main, ["--from-hf", tmp_path / "hf", "--out", tmp_path / "w.pt"])
    assert code == 2 and err == (f"error: {tmp_path / 'hf'} holds 9 tensors a model of its config.json has no place "
                                 "for (first: model.layers.1.input_layernorm.weight); only Llama and Mixtral "
                                 "checkpoints can be loaded\n")


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


# --- --init.from_hf: a run that starts from a Hugging Face folder's weights ---

def processor(sp_model: bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=sp_model)


def write_dataset(root, sp_model: bytes, *, seq_len: int = 32, train_rows: int = 48, val_rows: int = 16) -> str:
    """A finished raylm dataset made in this process (dataprep would start Ray): TEXT tokenized, each document ending
    in EOS, packed end to end (repeated as needed) into rows of seq_len + 1 tokens."""
    import numpy as np

    from raylm.dataset import FORMAT, FORMAT_VERSION, MANIFEST, rows_per_batch
    from raylm.shard_writer import ShardWriter
    from raylm.tokenizer import sha256, token_dtype

    sp = processor(sp_model)
    dtype = token_dtype(sp.vocab_size())
    stream = np.concatenate([ids + [sp.eos_id()] for ids in encode_exact(sp, TEXT)])
    rows = np.resize(stream, (train_rows + val_rows) * (seq_len + 1)).astype(dtype).reshape(-1, seq_len + 1)
    root.mkdir()
    (root / "tokenizer.model").write_bytes(sp_model)
    splits = {}
    for split, part in (("train", rows[:train_rows]), ("val", rows[train_rows:])):
        writer = ShardWriter(str(root), f"{split}/shard-00000.arrow", dtype, seq_len + 1)
        writer.write(part)
        splits[split] = {"shards": [writer.close()], "rows": len(part), "tokens": part.size}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "seq_len": seq_len, "row_len": seq_len + 1,
        "dtype": dtype.name, "rows_per_batch": rows_per_batch(seq_len + 1, dtype), "seed": 0, "splits": splits,
        "tokenizer": {"kind": "sentencepiece", "file": "tokenizer.model", "files": ["tokenizer.model"],
                      "sha256": sha256(sp_model), "vocab_size": sp.vocab_size(), "bos_id": sp.bos_id(),
                      "eos_id": sp.eos_id()},
    }
    (root / MANIFEST).write_text(json.dumps(manifest))
    return str(root)


def hf_model(folder, *, vocab: int, experts: int = 0, tied: bool = False, dtype=torch.float32, shard="100KB",
             dim: int = 64, hidden: int = 128):
    """A tiny random Llama (or Mixtral with `experts`) written by transformers' own save_pretrained, in shards of
    `shard` with an index, as published checkpoints are."""
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=dim, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=hidden, max_position_embeddings=64, tie_word_embeddings=tied)
    cfg = (transformers.MixtralConfig(num_local_experts=experts, num_experts_per_tok=2, **common) if experts
           else transformers.LlamaConfig(**common))
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    model.save_pretrained(folder, max_shard_size=shard)
    return model


@pytest.mark.heavy
def test_a_run_from_a_hugging_face_folder_trains_exports_and_resumes(tmp_path, sp_model, caplog):
    """The acceptance path: a sharded Llama folder → `python -m trainer --init.from_hf` (its config.json, not the
    preset's [model], sets the architecture) → export → transformers generates what raylm generates. The step-0
    validation loss is the folder's model's own on the same rows, so the weights really came from it; a re-run
    continues the run's own checkpoint, never re-initialising from the folder."""
    import numpy as np
    import torch.nn.functional as F

    from helpers import TINY, metrics
    from raylm.dataset import open_dataset
    from trainer.__main__ import main as trainer_main

    dataset = write_dataset(tmp_path / "data", sp_model)
    sp = processor(sp_model)
    source = tmp_path / "llama"
    hf = hf_model(source, vocab=sp.vocab_size())
    assert (source / "model.safetensors.index.json").exists() and len(list(source.glob("*.safetensors"))) > 2
    run = tmp_path / "run"
    argv = ["--no-ray", *TINY, "--data.path", dataset, "--run.dir", run, f"--init.from_hf={source}",
            "--train.log_every=1", "--train.eval_every=0", "--checkpoint.every=2"]
    caplog.set_level("INFO", logger="trainer")
    code, _, err = run_captured(trainer_main, [*argv, "--train.steps=4"])
    assert code == 0, err
    assert f"initialised from Hugging Face {source} (" in caplog.text and "MB read by this rank)" in caplog.text

    rows = torch.from_numpy(open_dataset(dataset).val.rows(np.arange(16)).astype(np.int64))
    with torch.no_grad():
        logits = hf(rows[:, :-1]).logits
    expected = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten()).item()
    start = metrics(str(run))[0]
    assert start["step"] == 0 and abs(start["val_loss"] - expected) < 1e-4, (start, expected)

    code, _, err = run_captured(export_cli.main, ["--checkpoint", run, "--out", tmp_path / "hf2"])
    assert code == 0, err
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")
    assert hf2.config.intermediate_size == 128  # the folder's, not configs/tiny.toml's ffn_hidden=192
    prompt = encode_exact(sp, ["def add("])[0]
    theirs = hf2.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                          eos_token_id=None, pad_token_id=0)[0].tolist()
    assert generate(load_weights(str(run)).model(), prompt, 24) == theirs
    before, after = dict(hf.named_parameters()), dict(hf2.named_parameters())
    assert before.keys() == after.keys() and not any(torch.equal(before[k], after[k]) for k in before)

    caplog.clear()
    code, _, err = run_captured(trainer_main, [*argv, "--train.steps=6"])
    assert code == 0, err
    assert "resumed from" in caplog.text and "initialised from Hugging Face" not in caplog.text
    assert [m["step"] for m in metrics(str(run)) if "loss" in m] == list(range(1, 7))


def rank_loads(rank: int, world: int, port: int, folder: str, out: str) -> None:
    """One gloo rank: the FSDP2-sharded model of the folder's config, filled by `load_hf_weights`; rank 0 saves the
    gathered weights, every rank's byte counts and the stacked experts' placements."""
    import torch.distributed as dist

    from trainer.distributed import Dist
    from trainer.hf import load_hf_weights, model_config_from_hf, read_config
    from trainer.job import JobConfig
    from trainer.parallelize import plain_name
    from trainer.train import build_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    job = JobConfig()
    job.model = model_config_from_hf(read_config(folder), folder)
    model = build_model(job, Dist(rank, world, torch.device("cpu")))
    read = load_hf_weights(model, folder)
    reads = [None] * world
    dist.all_gather_object(reads, (read.headers, read.tensors))
    state = {plain_name(name): p.full_tensor() for name, p in model.named_parameters()}
    placements = {plain_name(name): p.placements for name, p in model.named_parameters() if p.dim() == 3}
    if rank == 0:
        torch.save({"state": state, "reads": reads, "placements": placements}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("model,world,expert_dim", [
    (dict(vocab=361), 2, None),
    (dict(vocab=360, experts=4, tied=True, dtype=torch.bfloat16), 2, 0),
    (dict(vocab=360, experts=4, dim=48, hidden=96), 3, 1),
], ids=["llama-uneven-rows", "mixtral-tied-bf16", "mixtral-experts-on-dim-1"])
@pytest.mark.heavy
def test_each_rank_reads_only_its_rows(tmp_path, model, world, expert_dim):
    """W gloo ranks: each reads about 1/W of the tensors' bytes (plus the files' headers), together exactly all of
    them once, and the gathered model is the folder's weights (cast to fp32). 361 vocabulary rows shard 181/180.
    Mixtral's 4 experts on 2 ranks shard on dim 0: each rank reads its own experts' per-expert tensors. On 3 ranks
    they shard on dim 1: each rank reads its third of the rows of every expert's w1 ‖ w3 (192 rows: rank 1's
    [64, 128) straddles w1's end at 96) and w2 (48 rows)."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from raylm.ray_session import free_port
    from trainer.hf import import_folder

    folder = tmp_path / "hf"
    hf_model(folder, **model)
    mp.spawn(rank_loads, args=(world, free_port(), str(folder), str(tmp_path / "out.pt")), nprocs=world)
    got = torch.load(tmp_path / "out.pt")
    assert {str(p) for p in got["placements"].values()} == ({f"(Shard(dim={expert_dim}),)"} if model.get("experts")
                                                            else set())
    cfg, expected = import_folder(str(folder))  # the whole-file reader: every tensor, cast to fp32
    assert got["state"].keys() == expected.keys()
    assert all(torch.equal(got["state"][k], expected[k]) for k in expected)
    files = sorted(folder.glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(f).items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    headers = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in files)
    heads, tensors_read = zip(*got["reads"])
    assert len(files) > 2 and sum(tensors_read) == total, (tensors_read, total)
    assert all(abs(t - total / world) < 0.02 * total for t in tensors_read), (tensors_read, total)
    assert all(headers <= h == heads[0] < headers + 8 * 1024 * len(files) for h in heads), (heads, headers)


def test_init_from_hf_refusals_are_one_line_before_any_worker(tmp_path, sp_model):
    """A dataset whose tokenizer has more tokens than the model's embedding rows, and two sources of weights, are
    refused on the driver in one line; a smaller tokenizer is fine (published models pad their embeddings)."""
    from raylm.config import load_config
    from trainer.__main__ import check_before_launch, main as trainer_main
    from trainer.job import JobConfig

    dataset = write_dataset(tmp_path / "data", sp_model)
    small, padded = tmp_path / "small", tmp_path / "padded"
    hf_model(small, vocab=300, shard="10GB")
    hf_model(padded, vocab=384, shard="10GB")
    common = ["--no-ray", "--config", "configs/tiny.toml", "--data.path", dataset, "--run.dir", tmp_path / "run"]
    code, out, err = run_captured(trainer_main, [*common, f"--init.from_hf={small}"])
    assert code == 2 and out == "" and err == (
        f"error: dataset {dataset} has a 360-token tokenizer but init.from_hf={small} has vocab_size 300; tokenize the "
        f"data with the model's own tokenizer (python -m dataprep --tokenizer {small} ...)\n")
    code, _, err = run_captured(trainer_main, [*common, f"--init.from_hf={padded}", f"--checkpoint.resume_from={small}"])
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: --init.from_hf={padded} and "
                                                                 f"--checkpoint.resume_from={small} ")
    assert not (tmp_path / "run").exists()
    job = load_config(JobConfig, "configs/tiny.toml", ["--data.path", dataset, f"--init.from_hf={padded}"])
    assert check_before_launch(job, max_world=1) == (0, [])
    assert (job.model.vocab_size, job.model.ffn_hidden, job.model.max_seq_len) == (384, 128, 64)


def test_a_folder_that_does_not_match_its_config_names_the_tensor(tmp_path):
    """A tensor missing or of another shape than config.json implies is a DataError naming it and the folder."""
    from raylm.errors import DataError
    from trainer.hf import load_hf_weights, model_config_from_hf, read_config

    folder = tmp_path / "hf"
    hf_model(folder, vocab=300)
    config = json.loads((folder / "config.json").read_text())

    def load_with(**changed) -> None:
        (folder / "config.json").write_text(json.dumps({**config, **changed}))
        with torch.device("meta"):
            model = Transformer(model_config_from_hf(read_config(str(folder)), str(folder)))
        load_hf_weights(model.to_empty(device="cpu"), str(folder))

    with pytest.raises(DataError, match=rf"^{folder} has no tensor model\.layers\.2\.\S+, which a model of its config"):
        load_with(num_hidden_layers=3)
    with pytest.raises(DataError, match=rf"^{folder}: tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape "
                                        r"\[128, 64\], but its config.json makes it \[256, 64\]$"):
        load_with(intermediate_size=256)


def test_init_from_hf_reads_an_s3_folder(tmp_path, s3_server):
    """The same loader on s3:// (moto): config.json and the shards' byte ranges through raylm.storage."""
    from helpers import upload_dir
    from trainer.hf import import_folder, load_hf_weights, model_config_from_hf, read_config

    hf_model(tmp_path / "hf", vocab=300, experts=2, tied=True)
    url = f"{s3_server}/{tmp_path.name}/hf"
    upload_dir(tmp_path / "hf", url)
    cfg = model_config_from_hf(read_config(url), url)
    with torch.device("meta"):
        model = Transformer(cfg)
    read = load_hf_weights(model.to_empty(device="cpu"), url)
    local_cfg, expected = import_folder(str(tmp_path / "hf"))
    assert cfg == local_cfg and read.tensors == sum(v.numel() * 4 for v in expected.values())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_load_weights_reads_an_s3_folder(tmp_path, sp_model, s3_server):
    """`load_weights` (generate, chat, export, the harness) takes an s3:// Hugging Face folder through the reader
    `--init.from_hf` uses: the same config, tensors and tokenizer as from the local folder, which are the exported
    weights; generate continues a prompt from it as from the local folder."""
    from helpers import upload_dir

    path = weights_file(tmp_path, sp_model, n_experts=4, top_k=2, tie_embeddings=True)
    assert run_captured(export_cli.main, ["--checkpoint", path, "--out", tmp_path / "hf"])[0] == 0
    url = f"{s3_server}/{tmp_path.name}/hf"
    upload_dir(tmp_path / "hf", url)
    exported, local, remote = load_weights(path), load_weights(str(tmp_path / "hf")), load_weights(url)
    assert remote.cfg == local.cfg == exported.cfg and remote.tokenizer == local.tokenizer == exported.tokenizer
    assert remote.state.keys() == local.state.keys() == exported.state.keys()
    assert all(torch.equal(remote.state[k], local.state[k]) and torch.equal(local.state[k], exported.state[k])
               for k in exported.state)
    argv = ["--prompt", "def ", "--max_new_tokens", "8"]
    from_s3 = run_captured(generate_cli.main, ["--checkpoint", url, *argv])
    assert from_s3[0] == 0 and from_s3 == run_captured(generate_cli.main, ["--checkpoint", tmp_path / "hf", *argv])
