"""BOS where the model expects it: the tokenizer knows whether its model's documents start with BOS (as transformers
encodes), dataprep's `--bos` puts it at each document start, training refuses data in another format than the
imported model's, and scoring an imported Llama gives transformers' own log-likelihoods."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from dataprep.chat import tokenize as tokenize_chat
from dataprep.sources import Record
from helpers import TINY, hf_tokenizer_dir, run_captured, write_packed_dataset
from raylm.dataset import open_dataset
from raylm.tokenizer import load_tokenizer, read_tokenizer_files, train_tokenizer

transformers = pytest.importorskip("transformers")

WORDS = ("the a river stone cloud green happy table light music ocean paper tiger runs over under quickly slowly "
         "Alice Bob café 数字 7 42 , . ! ? -").split()
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def text(rng: random.Random, words: int) -> str:
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(max(1, words // 6))]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    rng = random.Random(0)
    return [text(rng, rng.randint(3, 80)) for _ in range(24)]


@pytest.fixture(scope="module")
def raylm_tokenizer(corpus):
    return load_tokenizer(train_tokenizer(corpus, vocab_size=400, num_threads=1))


def llama3_folder(root, lines: list[str], *, adds_bos: bool = True) -> str:
    """A Llama-3-style tokenizer folder: byte-level BPE whose tokenizer.json post-processor puts <|begin_of_text|>
    before every text, as Meta's does (`adds_bos=False`: without it)."""
    from tokenizers import Tokenizer, processors

    folder = hf_tokenizer_dir(root, lines)
    if adds_bos:
        tok = Tokenizer.from_file(f"{folder}/tokenizer.json")
        bos = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, bos)])
        tok.save(f"{folder}/tokenizer.json")
    return folder


@pytest.mark.parametrize("adds_bos", [True, False], ids=["llama3", "no-post-processor"])
def test_the_tokenizer_knows_whether_transformers_puts_bos_first(tmp_path, corpus, adds_bos):
    folder = llama3_folder(tmp_path / "tok", corpus, adds_bos=adds_bos)
    expects = adds_bos
    tok = load_tokenizer(read_tokenizer_files(folder))
    theirs = transformers.AutoTokenizer.from_pretrained(folder)("Alice runs")["input_ids"]
    assert tok.bos_first == expects == (theirs[0] == tok.bos_id)
    assert tok.document_start == (tok.bos_id if expects else tok.eos_id)
    assert tok.with_bos(not expects).document_start == (tok.eos_id if expects else tok.bos_id)


def test_raylms_own_tokenizer_separates_documents_with_eos(raylm_tokenizer):
    tok = raylm_tokenizer
    assert tok.bos_id is not None and not tok.bos_first and tok.document_start == tok.eos_id


def dataprep(tmp_path, corpus: list[str], tokenizer: str, out: str, *extra: str) -> tuple[int, str]:
    from dataprep.__main__ import main

    inputs = tmp_path / "docs"
    if not inputs.exists():
        inputs.mkdir()
        for i, doc in enumerate(corpus):
            (inputs / f"{i:03d}.txt").write_text(doc)
    code, _, err = run_captured(main, ["--input", inputs, "--output", tmp_path / out, "--tokenizer", tokenizer,
                                       "--seq-len", "16", "--val-fraction", "0", "--workers.local=true", *extra])
    return code, err


def stream(directory) -> np.ndarray:
    dataset = open_dataset(str(directory))
    return dataset.train.rows(np.arange(len(dataset.train))).reshape(-1).astype(np.int64)


def test_a_llama3_dataset_starts_every_document_with_bos(tmp_path, corpus, monkeypatch):
    """Acceptance 6: every document of the packed stream is BOS, its text, EOS, in file order; a document read in
    chunks (CHUNK_CHARS made small) gets one BOS, at its start. The manifest records the choice; --bos off packs
    as before, and resuming or redoing the dataset with another --bos is refused like any other setting."""
    monkeypatch.setattr("dataprep.sources.CHUNK_CHARS", 64)
    folder = llama3_folder(tmp_path / "tok", corpus)
    tok = load_tokenizer(read_tokenizer_files(folder))
    assert max(map(len, corpus)) > 4 * 64, "some document is read in chunks"
    code, err = dataprep(tmp_path, corpus, folder, "on")
    assert code == 0, err
    ids = stream(tmp_path / "on")
    starts = np.flatnonzero(ids == tok.bos_id)
    ends = np.flatnonzero(ids == tok.eos_id)
    assert starts[0] == 0 and np.array_equal(starts[1:], ends[:len(starts) - 1] + 1)
    docs = [tok.decode(ids[s + 1:e].tolist()) for s, e in zip(starts, ends)]
    assert len(docs) > 10 and docs == corpus[:len(docs)]
    manifest = open_dataset(str(tmp_path / "on")).manifest
    assert manifest["bos"] is True and manifest["bos_id"] == tok.bos_id == tok.tok.token_to_id(BOS)
    assert open_dataset(str(tmp_path / "on")).tokenizer().document_start == tok.bos_id

    code, err = dataprep(tmp_path, corpus, folder, "off", "--bos", "off")
    assert code == 0, err
    off = stream(tmp_path / "off")
    assert tok.bos_id not in off and open_dataset(str(tmp_path / "off")).manifest["bos"] is False
    assert open_dataset(str(tmp_path / "off")).tokenizer().document_start == tok.eos_id
    code, err = dataprep(tmp_path, corpus, folder, "off", "--bos", "on")
    assert code == 2 and err.count("\n") == 1 and "other settings" in err and "bos" in err, err


def test_bos_on_needs_a_tokenizer_with_one(tmp_path, corpus):
    from tokenizers import Tokenizer

    folder = hf_tokenizer_dir(tmp_path / "tok", corpus)
    (tmp_path / "tok" / "tokenizer_config.json").unlink()  # a bare tokenizer.json: EOS by name, no BOS
    Tokenizer.from_file(f"{folder}/tokenizer.json").save(f"{folder}/tokenizer.json")
    code, err = dataprep(tmp_path, corpus, f"{folder}/tokenizer.json", "ds", "--bos", "on")
    assert code == 2 and err.count("\n") == 1 and "has no BOS token" in err, err
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_a_conversation_gets_one_bos_whoever_renders_it(tmp_path, corpus, raylm_tokenizer):
    """Llama 3's template renders BOS itself: never doubled. raylm's template does not: BOS is put before the
    conversation when the dataset's documents start with it, and carries no loss."""
    record = Record("x.jsonl:0", "x.jsonl:1", {"prompt": "Alice runs?", "response": "Bob runs."})
    llama = load_tokenizer(read_tokenizer_files(llama3_folder(tmp_path / "tok", corpus)))
    raylm = raylm_tokenizer
    for tok in (llama.with_bos(True), llama.with_bos(False)):
        example = tokenize_chat(tok, record)
        assert example.tokens[0] == tok.bos_id and tok.bos_id not in example.tokens[1:]
    plain = tokenize_chat(raylm.with_bos(False), record)
    with_bos = tokenize_chat(raylm.with_bos(True), record)
    assert plain.tokens[0] != raylm.bos_id
    assert with_bos.tokens == [raylm.bos_id] + plain.tokens and with_bos.loss == [False] + plain.loss


def llama_folder(root, tokenizer_folder: str, vocab: int):
    """A tiny random LlamaForCausalLM written by transformers, with the tokenizer's files beside it."""
    import shutil

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(root)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tokenizer_folder}/{name}", root / name)
    return model


def test_init_from_hf_refuses_data_in_another_format(tmp_path, corpus):
    """A Llama 3 (its tokenizer adds BOS) on data without BOS, and the reverse, stop in one line before any
    worker, naming the dataset, the flag and the fix; so does scoring such data as a held-out set."""
    from trainer.__main__ import main as train
    from trainer.eval.cli import main as evaluate

    for adds, bos in ((True, False), (False, True)):
        folder = llama3_folder(tmp_path / f"tok-{adds}", corpus, adds_bos=adds)
        tok = load_tokenizer(read_tokenizer_files(folder))
        data = write_packed_dataset(tmp_path / f"data-{adds}", tok, {"train": {"x": corpus * 4}, "val": {"x": corpus}},
                                    seq_len=16)
        manifest = tmp_path / f"data-{adds}" / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "bos": bos}))
        llama_folder(tmp_path / f"llama-{adds}", folder, tok.vocab_size)
        code, _, err = run_captured(train, ["--no-ray", *TINY, "--data.path", data, "--run.dir", tmp_path / "run",
                                            f"--init.from_hf={tmp_path / f'llama-{adds}'}", "--train.steps=1"])
        assert code == 2 and err.count("\n") == 1, err
        assert f"dataset {data} was made with --bos {'on' if bos else 'off'}" in err
        assert f"--bos {'on' if adds else 'off'}" in err.split("make the data again")[1], err
        assert not (tmp_path / "run").exists()
        code, _, err = run_captured(evaluate, ["--no-ray", "--checkpoint", tmp_path / f"llama-{adds}", "--data.path",
                                               data])
        assert code == 2 and err.count("\n") == 1, err
        assert f"was made with --bos {'on' if bos else 'off'}" in err
        assert f"again with --bos {'on' if adds else 'off'}" in err


def test_an_imported_llama_scores_as_transformers_does_with_its_own_special_tokens(tmp_path, corpus):
    """Acceptance 6: `python -m trainer.eval` of a transformers-written Llama folder with a Llama-3 tokenizer gives,
    choice by choice, the log-likelihood transformers computes on `tokenizer(context + continuation)` (BOS first)."""
    from trainer.eval.cli import main as evaluate

    folder = llama3_folder(tmp_path / "tok", corpus)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = llama_folder(tmp_path / "llama", folder, load_tokenizer(read_tokenizer_files(folder)).vocab_size)
    rng = random.Random(1)
    items = [{"query": text(rng, 8).strip(), "choices": [text(rng, 3).strip() for _ in range(3)], "gold": 0}
             for _ in range(4)]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(item) + "\n" for item in items))
    code, _, err = run_captured(evaluate, ["--no-ray", "--checkpoint", tmp_path / "llama", "--tasks", task,
                                           "--out", tmp_path / "r.json"])
    assert code == 0, err
    ours = json.loads((tmp_path / "r.json").read_text())["tasks"]["task"]["loglikelihoods"]
    want = []
    for item in items:
        lls = []
        for choice in item["choices"]:
            ids = theirs_tok(item["query"] + " " + choice)["input_ids"]
            n = len(ids) - len(theirs_tok(item["query"])["input_ids"])
            assert ids[0] == theirs_tok.bos_token_id and n > 0
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -n - 1:-1].double()
            lls.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[-n:])[:, None]).sum().item())
        want.append(lls)
    assert np.allclose(ours, want, rtol=0, atol=1e-4), (ours, want)


def test_the_harness_adapter_scores_a_text_after_bos_as_transformers_does(tmp_path, corpus):
    """lm-eval's rolling log-likelihood of a text through raylm's adapter, on an imported Llama 3, is transformers'
    log-probability of every token after BOS of `tokenizer(text)`."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from trainer.eval.harness import RaylmLM

    folder = llama3_folder(tmp_path / "tok", corpus)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = llama_folder(tmp_path / "llama", folder, load_tokenizer(read_tokenizer_files(folder)).vocab_size)
    lm = RaylmLM(str(tmp_path / "llama"), batch_size=2, device="cpu")
    doc = corpus[0][:120]
    ours = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)])[0]
    ids = theirs_tok(doc)["input_ids"]
    assert ids[0] == theirs_tok.bos_token_id and len(ids) <= 64
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert abs(ours - want) < 1e-4, (ours, want)
