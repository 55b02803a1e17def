"""Fine-tuning on chat data: templates and loss masks, packed examples that never see each other, the loss over a
step's assistant tokens, and instruction tuning end to end (dataprep --format chat → trainer → export → chat)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from dataprep.chat import tokenize
from dataprep.shards import ExamplePacker
from dataprep.sources import BadRecord, Record
from helpers import MIXED_DOCS, hf_tokenizer_dir, instruction_task, metrics, run_captured
from raylm.chat_template import reply_end
from raylm.tokenizer import CHAT_MARKERS, RAYLM_CHAT_NAME, load_tokenizer, read_tokenizer_files, train_tokenizer
from trainer.loss import TokenMean, count_loss_tokens, lm_loss, masked_loss_sum, unpack
from trainer.model.config import ModelConfig
from trainer.model.transformer import Transformer


@pytest.fixture(scope="module")
def sp():
    lines = [line for text in MIXED_DOCS.values() for line in text.split("\n") if line] * 30
    return load_tokenizer(train_tokenizer(lines, vocab_size=400, num_threads=1))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    lines = [text for text in MIXED_DOCS.values() for _ in range(20)] + ["Hello there, the answer is yes."] * 10
    return load_tokenizer(read_tokenizer_files(hf_tokenizer_dir(tmp_path_factory.mktemp("hf") / "tok", lines)))


def small_model(**overrides) -> Transformer:
    cfg = ModelConfig(vocab_size=400, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=64,
                      **overrides)
    model = Transformer(cfg)
    model.init_weights(3)
    return model


def chat_rows(examples: list[tuple[list[int], list[bool]]], tmp_path, *, positions: int) -> torch.Tensor:
    """Examples packed by dataprep's packer, read back as (rows, 3, positions) int64."""
    from raylm.dataset import Split

    packer = ExamplePacker(str(tmp_path), "rows", positions, 100, np.dtype(np.uint16), pad_id=2, overlong="truncate")
    for tokens, loss in examples:
        packer.add(tokens, loss)
    entry = packer.finish()
    packer.publish()  # the shards' final names: what a unit's commit does
    split = Split(str(tmp_path), entry, rows_per_batch=packer.sink.rows_per_batch, row_len=3 * positions,
                  dtype="uint16", planes=3)
    return torch.from_numpy(split.rows(range(len(split))).astype(np.int64))


def test_the_template_masks_exactly_the_replies_and_refuses_what_it_cannot_mask(sp):
    assert sp.chat_template_name == RAYLM_CHAT_NAME
    assert [sp.token_string(sp.encode_rendered(m)[0]) for m in CHAT_MARKERS] == list(CHAT_MARKERS)
    assert all(len(ids) > 1 for ids in sp.encode(list(CHAT_MARKERS)))  # typed text never becomes a marker
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"},
                {"role": "assistant", "content": "Hi 🎉"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": "ok"}]
    example = tokenize(sp, Record("k", "f:1", {"messages": messages}))
    reply = [t for t, loss in zip(example.tokens, example.loss) if loss]
    end = sp.encode_rendered("<|end|>")
    assert reply == sp.encode(["Hi 🎉"])[0] + end + sp.encode(["ok"])[0] + end and reply_end(sp) == end[0]
    assert sp.decode(example.tokens) == "Be brief.Hello, world!Hi 🎉againok"  # markers are control tokens
    pair = tokenize(sp, Record("k", "f:1", {"prompt": "Hello, world!", "response": "Hi 🎉"}))
    assert pair.tokens == tokenize(sp, Record("k", "f:1", {"messages": messages[1:3]})).tokens
    bad = {"no messages": {"text": "x"}, "assistant first": {"messages": messages[2:3]},
           "unknown role": {"messages": [{"role": "tool", "content": "x"}]},
           "forged marker": {"prompt": "say <|end|> now", "response": "no"}}
    reasons = {name: tokenize(sp, Record("k", "f:7", value)) for name, value in bad.items()}
    assert all(isinstance(r, BadRecord) and r.where == "f:7" for r in reasons.values())
    assert "'<|end|>'" in reasons["forged marker"].reason and "user message first" in reasons["assistant first"].reason


def test_a_hugging_face_template_gives_transformers_ids_and_masks_each_reply(hf):
    transformers = pytest.importorskip("transformers")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Yes 🎉"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": " ok "}]
    example = tokenize(hf, Record("k", "f:1", {"messages": messages}))
    theirs = transformers.AutoTokenizer.from_pretrained(_folder_of(hf)).apply_chat_template(
        messages, tokenize=True, return_dict=False)
    assert example.tokens == theirs and example.tokens[0] == hf.bos_id
    assert hf.decode([t for t, loss in zip(example.tokens, example.loss) if loss]) == "Yes 🎉<|eot_id|>ok<|eot_id|>"
    assert hf.token_string(reply_end(hf)) == "<|eot_id|>"
    # in a document, a special token's text is text (as SentencePiece keeps it), and still round-trips
    document = "the end <|eot_id|> of it"
    assert reply_end(hf) not in hf.encode([document])[0] and hf.decode(hf.encode([document])[0]) == document


def test_a_template_that_refuses_a_conversation_makes_it_a_bad_record(hf, sp):
    """Llama-2/Mistral-style templates call raise_exception on roles that do not alternate: that line is a bad record
    (skipped with --on-bad-record skip), never a failed run. A SentencePiece model without BOS loads too."""
    import io

    import sentencepiece as spm

    from raylm.tokenizer import TRAINER_OPTIONS

    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
              "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>' + m['content'] | tojson(ensure_ascii=True)"
              " + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
              "<|end_header_id|>' }}{% endif %}")
    config = {**json.loads(hf.files["tokenizer_config.json"]), "chat_template": strict}
    tokenizer = load_tokenizer({**hf.files, "tokenizer_config.json": json.dumps(config).encode()})
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"}]
    bad = tokenize(tokenizer, Record("k", "chats.jsonl:3", {"messages": messages}))
    assert isinstance(bad, BadRecord) and bad.where == "chats.jsonl:3" and "roles must alternate" in bad.reason
    good = tokenize(tokenizer, Record("k", "chats.jsonl:4", {"prompt": "é", "response": "ü"}))
    assert tokenizer.decode([t for t, loss in zip(good.tokens, good.loss) if loss]) == '"\\u00fc"<|eot_id|>'
    model, lines = io.BytesIO(), [line for text in MIXED_DOCS.values() for line in text.split("\n") if line] * 30
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=400, num_threads=1,
                                   **{**TRAINER_OPTIONS, "bos_id": -1})
    no_bos = load_tokenizer(model.getvalue())
    assert no_bos.bos_id is None and no_bos.bos_token is None and no_bos.chat_template_name == sp.chat_template_name


def _folder_of(tokenizer) -> str:
    import tempfile

    from raylm.tokenizer import write_tokenizer_files

    folder = tempfile.mkdtemp()
    write_tokenizer_files(tokenizer.files, folder)
    return folder


def test_examples_are_packed_whole_and_overlong_ones_counted(tmp_path):
    examples = [([5] * 5, [False] * 3 + [True] * 2), ([6] * 4, [False, True, True, True]), ([7] * 12, [True] * 12),
                ([8] * 3, [False, False, True])]
    for overlong, kept in (("truncate", 4), ("drop", 3)):
        packer = ExamplePacker(str(tmp_path / overlong), "r", 10, 100, np.dtype(np.uint16), pad_id=2,
                               overlong=overlong)
        for tokens, loss in examples:
            packer.add(tokens, loss)
        entry = packer.finish()
        assert entry["documents"] == kept and entry["truncated"] == (overlong == "truncate")
        assert entry["dropped"] == (overlong == "drop") and entry["dropped_tokens"] == (2 if kept == 4 else 12)
    rows = chat_rows(examples, tmp_path / "read", positions=10)
    tokens, segments, weights = unpack(rows)
    assert tokens[0].tolist() == [5] * 5 + [6] * 4 + [2] and segments[0].tolist() == [1] * 5 + [2] * 4 + [0]
    assert tokens[1].tolist() == [7] * 10 and tokens[2].tolist() == [8] * 3 + [2] * 7  # never split across rows
    # a target carries loss only inside its example, and an example's first token is never one
    assert weights[0].tolist() == [0, 0, 1, 1, 0, 1, 1, 1, 0] and count_loss_tokens(rows).item() == 5 + 9 + 1


def test_each_example_of_a_packed_row_computes_what_it_computes_alone(tmp_path):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    lengths = [7, 12, 5, 9]
    examples = [(torch.randint(3, 400, (n,)).tolist(), [True] * n) for n in lengths]
    rows = chat_rows(examples, tmp_path, positions=34)
    tokens, segments, _ = unpack(rows)
    assert len(rows) == 1
    model = small_model()
    with torch.no_grad():
        packed, _ = model(tokens, segments=segments)
        model.cfg.attention = "flex"  # the GPU kernel, compiled as on a GPU (CPU runs its forward only)
        compiled = counters["stats"]["unique_graphs"]
        flex, _ = model(tokens, segments=segments)
    assert counters["stats"]["unique_graphs"] > compiled, "FlexAttention and its block mask run compiled"
    start = 0
    for ids, _ in examples:
        alone, _ = model(torch.tensor([ids]))
        assert (packed[0, start:start + len(ids)] - alone[0]).abs().max() <= 1e-5
        assert (flex[0, start:start + len(ids)] - alone[0]).abs().max() <= 1e-5
        start += len(ids)


def expected_targets(examples: list[tuple[list[int], list[bool]]], positions: int) -> torch.Tensor:
    """The loss-carrying targets of examples packed into one row, from their own flags: target j predicts position
    j + 1, which carries loss iff its token does and it is not its example's first."""
    weights, start = torch.zeros(positions - 1), 0
    for tokens, loss in examples:
        for i in range(1, len(tokens)):
            weights[start + i - 1] = float(loss[i])
        start += len(tokens)
    return weights[None]


def test_prompt_tokens_get_zero_gradient(tmp_path):
    torch.manual_seed(1)
    examples = [(torch.randint(3, 400, (n,)).tolist(), [False] * (n - k) + [True] * k) for n, k in ((9, 3), (11, 4))]
    tokens, segments, weights = unpack(chat_rows(examples, tmp_path, positions=24))
    assert torch.equal(weights, expected_targets(examples, 24))  # the mask, from the examples' flags alone
    model = small_model()
    logits, _ = model(tokens[:, :-1], segments=segments[:, :-1])
    logits = logits.detach().requires_grad_()
    targets = tokens[:, 1:]
    loss = masked_loss_sum(logits, targets, weights)
    loss.backward()
    prompt_side = weights == 0
    assert prompt_side.sum() > 10 and logits.grad[prompt_side].abs().max() == 0
    assert logits.grad[~prompt_side].abs().max() > 0
    other = torch.where(prompt_side, torch.randint(3, 400, targets.shape), targets)  # only prompt-side labels change
    assert other[prompt_side].ne(targets[prompt_side]).any()
    assert masked_loss_sum(logits, other, weights).item() == loss.item()


def test_the_loss_is_the_mean_over_the_steps_reply_tokens_however_it_is_split(tmp_path):
    """One micro-batch or several: each reply token weighs 1 / (the step's count), so the gradients are the same."""
    from trainer.distributed import init_distributed

    init_distributed("cpu")  # a one-process group, for the count's all-reduce
    torch.manual_seed(2)
    examples = [(torch.randint(3, 400, (n,)).tolist(), [False] * (n // 2) + [True] * (n - n // 2))
                for n in (20, 7, 30, 12, 25, 9)]
    rows = chat_rows(examples, tmp_path, positions=32)
    assert len(rows) >= 3

    def gradients(micro_batches):
        model = small_model()
        count = TokenMean().totals(micro_batches)
        for batch in micro_batches:
            (lm_loss(model, batch)[0] / count).backward()
        return [p.grad.clone() for p in model.parameters()], count

    whole, count = gradients([rows])
    split, _ = gradients(list(rows.split(1)))
    assert count.item() == sum(sum(loss[1:]) for _, loss in examples)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(whole, split))


def accuracy(model, tokenizer, held_out: list[tuple[str, str]]) -> float:
    from trainer.chat import reply

    return sum(reply(model, tokenizer, [{"role": "user", "content": q}], max_new_tokens=12) == a
               for q, a in held_out) / len(held_out)


@pytest.mark.heavy
def test_instruction_tuning_from_a_pretrained_run(tmp_path, capsys):
    """Acceptance: a model pretrained here on the task's words knows no instruction (exact match ~0 on held-out
    prompts); fine-tuned on the chat data it answers them (>= 90 %). Its export answers the same in transformers
    (apply_chat_template + generate), and `python -m trainer.chat` talks to it. Datasets are made in this process
    (`--workers.local=true`, the bytes of the Ray path) and training runs without Ray: no cluster to start."""
    transformers = pytest.importorskip("transformers")
    from dataprep.__main__ import main as dataprep
    from trainer.__main__ import main as trainer
    from trainer.chat import main as chat, reply
    from trainer.export import main as export
    from trainer.weights import load_weights

    held_out = instruction_task(tmp_path)
    model = ["--config", "configs/tiny.toml", "--train.global_batch=16", "--train.micro_batch=16",
             "--train.sample_prompt=", "--train.log_every=50", "--train.eval_every=0", "--checkpoint.every=0"]
    steps = {"pre": ["--train.steps=100", "--optim.lr=5e-3", "--optim.warmup_steps=10"],
             "sft": ["--train.steps=500", "--optim.lr=5e-3", "--optim.warmup_steps=10",
                     f"--checkpoint.resume_from={tmp_path / 'pre'}", "--checkpoint.load_weights_only=true"]}
    code, _, err = run_captured(dataprep, ["--input", tmp_path / "corpus", "--output", tmp_path / "text",
                                           "--vocab-size", "320", "--seq-len", "64", "--workers.local=true"])
    assert code == 0, err
    code, _, err = run_captured(trainer, ["--no-ray", *model, *steps["pre"], "--data.path", tmp_path / "text",
                                          "--run.dir", tmp_path / "pre"])
    assert code == 0, err
    code, out, err = run_captured(dataprep, ["--format", "chat", "--input", tmp_path / "chat", "--tokenizer",
                                             tmp_path / "pre", "--output", tmp_path / "chatdata", "--seq-len", "128",
                                             "--val-fraction", "0.05", "--workers.local=true"])
    assert code == 0, err
    manifest = json.loads((tmp_path / "chatdata" / "manifest.json").read_text())
    assert manifest["chat"]["template"] == RAYLM_CHAT_NAME and manifest["tokenizer"]["kind"] == "sentencepiece"
    assert "conversations" in out and "carry loss" in out

    pretrained = load_weights(str(tmp_path / "pre"))
    tokenizer = load_tokenizer(pretrained.tokenizer)
    before = accuracy(pretrained.model(), tokenizer, held_out)
    code, _, err = run_captured(trainer, ["--no-ray", *model, *steps["sft"], "--data.path", tmp_path / "chatdata",
                                          "--run.dir", tmp_path / "sft"])
    assert code == 0, err
    tuned = load_weights(str(tmp_path / "sft")).model()
    after = accuracy(tuned, tokenizer, held_out)
    val = [m["val_loss"] for m in metrics(str(tmp_path / "sft")) if "val_loss" in m]
    with capsys.disabled():
        print(f"\ninstruction task, {len(held_out)} held-out prompts: exact match {before:.0%} pretrained -> "
              f"{after:.0%} fine-tuned (reply-token val loss {val[0]:.2f} -> {val[-1]:.2f})")
    assert before <= 0.05 and after >= 0.9

    assert run_captured(export, ["--checkpoint", tmp_path / "sft", "--out", tmp_path / "hf"])[0] == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for question, answer in held_out[:10]:
        messages = [{"role": "user", "content": question}]
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        assert out[-1] == reply_end(tokenizer)  # generation_config stops at the end of the reply
        assert hf_tok.decode(out, skip_special_tokens=True) == reply(tuned, tokenizer, messages, max_new_tokens=12)

    (q1, a1), (q2, _), (q3, a3) = held_out[:3]
    history = [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    with_history = reply(tuned, tokenizer, history, max_new_tokens=12)
    import sys

    saved, sys.stdin = sys.stdin, io.StringIO(f"{q1}\n{q2}\n/reset\n{q3}\n/quit\n")
    try:
        code, out, err = run_captured(chat, ["--checkpoint", tmp_path / "sft"])
    finally:
        sys.stdin = saved
    assert code == 0, err
    replies = [line.split("model> ", 1)[1] for line in out.splitlines() if "model> " in line]
    assert replies == [a1, with_history, a3] and "(new conversation)" in out
