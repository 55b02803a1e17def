"""Evaluation: bits per byte by hand, multiple-choice scoring of a memorised task, in-loop metrics in every sink,
and `python -m trainer.eval` giving the same figures on one and two workers."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from helpers import TINY, metrics, run_captured, write_packed_dataset
from raylm.dataset import open_dataset
from raylm.errors import ConfigError, DataError
from raylm.tokenizer import load_tokenizer, train_tokenizer
from trainer.eval.heldout import held_out, loss_sums, report
from trainer.eval.multiple_choice import load_task, read_items, score_task
from trainer.model.config import ModelConfig
from trainer.model.transformer import Transformer

NAMES = ("alice bob carol dave erin frank grace heidi ivan judy kevin laura mallory nina oscar peggy quinn rupert "
         "sybil trent ursula victor wendy xavier yvonne zack").split()
WORDS = "apple river stone cloud green happy table light music ocean paper tiger".split()


def tiny_model(vocab: int, seq_len: int) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=vocab,
                      max_seq_len=seq_len)
    model = Transformer(cfg)
    model.init_buffers()
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    lines = [f"{n} likes {w}. naïve café, 数字 {i}" for i, (n, w) in enumerate(zip(NAMES * 12, WORDS * 26))]
    return load_tokenizer(train_tokenizer(lines, vocab_size=400, num_threads=1))


def test_bits_per_byte_is_the_nll_over_ln2_times_the_bytes_of_the_targets(tokenizer, tmp_path):
    text = "alice likes a naïve café — 数字 7"
    ids = tokenizer.encode([text])[0] + [tokenizer.eos_id]
    seq_len = len(ids) - 1
    path = write_packed_dataset(tmp_path / "ds", tokenizer, {"train": {"a": [text]}, "val": {"a": [text]}},
                                seq_len=seq_len)
    model = tiny_model(tokenizer.vocab_size, seq_len)
    held = held_out(open_dataset(path), name="ds", token_bytes=tokenizer.token_bytes, rows=0, seed=0, micro_batch=4,
                    rank=0, world=1)
    got = report(held, loss_sums(model, held, torch.device("cpu")))

    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    nll = -torch.log_softmax(logits[0].double(), -1)[torch.arange(seq_len), torch.tensor(ids[1:])].sum().item()
    scored = len(text.encode()) - len(tokenizer.decode(ids[:1]).encode())  # the first token is no target; EOS: 0
    assert got["tokens"] == seq_len and got["bytes"] == scored
    assert got["bpb"] == pytest.approx(nll / (math.log(2) * scored), rel=1e-6)
    assert got["loss"] == pytest.approx(nll / seq_len, rel=1e-6)


def test_each_token_counts_the_bytes_it_stands_for(tokenizer, tmp_path):
    from helpers import hf_tokenizer_dir
    from raylm.tokenizer import read_tokenizer_files

    texts = ["def f(x):\n\treturn x ** 2  # naïve café 数字 ▁ \U0001F600", "  spaces   and\n\nnewlines",
             "<|end|> x"]
    hf = load_tokenizer(read_tokenizer_files(hf_tokenizer_dir(tmp_path / "hf", texts * 20)))
    for tok in (tokenizer, hf):
        for text in texts:
            assert tok.token_bytes[tok.encode([text])[0]].sum() == len(text.encode()), (tok.kind, text)
        assert tok.token_bytes[tok.eos_id] == 0


def test_a_task_line_that_is_wrong_is_named_with_its_field(tokenizer, tmp_path):
    task = tmp_path / "t.jsonl"
    good = {"query": "q", "choices": ["a", "b"], "gold": 1}
    for bad, message in (({**good, "gold": 2}, r"t.jsonl:2: \"gold\" must be the index"),
                         ({**good, "choices": ["a"]}, r"t.jsonl:2: \"choices\" must be a list"),
                         ({"choices": ["a", "b"], "gold": 0}, r"t.jsonl:2: \"query\" must be a string")):
        task.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=message):
            read_items(str(task))
    task.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(DataError, match="t.jsonl:2: not a JSON object"):
        read_items(str(task))
    task.write_text(json.dumps(good) + "\n" + json.dumps({**good, "choices": ["a", "b " * 40]}) + "\n")
    with pytest.raises(DataError, match="t.jsonl:2: a continuation of .* does not fit the model's 16-token context"):
        load_task(str(task), tokenizer, max_len=16)
    with pytest.raises(DataError, match="is a directory; pass a readable .jsonl file"):
        read_items(str(tmp_path))


def memory_task(root, *, items: int = 26, choices: int = 4) -> tuple[str, list[str]]:
    """A task whose answers are facts of the training text ('alice likes tiger.'): (task path, training docs)."""
    rng = random.Random(0)
    lines, docs = [], []
    for name in NAMES[:items]:
        options = rng.sample(WORDS, choices)
        gold = rng.randrange(choices)
        lines.append(json.dumps({"query": f"{name} likes", "choices": options, "gold": gold}))
        docs.append(f"{name} likes {options[gold]}.")
    path = root / "likes.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path), docs


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """A run trained until it knows the task's answers, with the task and a two-source held-out set evaluated in
    the loop: (run dir, task path, held-out dataset, training dataset)."""
    from trainer.__main__ import main

    root = tmp_path_factory.mktemp("memorise")
    task, facts = memory_task(root)
    rng = random.Random(1)
    train_docs = [doc for _ in range(40) for doc in rng.sample(facts, len(facts))]
    data = write_packed_dataset(root / "data", tokenizer, {"train": {"facts": train_docs}, "val": {"facts": facts * 4}},
                                seq_len=32)
    other = [f"{w} {v} and {u}" for w, v, u in zip(WORDS * 4, WORDS[3:] * 5, WORDS[5:] * 5)]
    held = write_packed_dataset(root / "heldout", tokenizer, {"val": {"facts": facts * 3, "words": other * 2}},
                                seq_len=32)
    run = root / "run"
    code, _, err = run_captured(main, ["--no-ray", *TINY, "--data.path", data, "--run.dir", run, "--train.steps=150",
                                       "--train.eval_every=75", "--optim.lr=1e-2", "--train.micro_batch=8",
                                       "--eval.tasks", task, "--eval.datasets", held, "--eval.rows=0",
                                       "--checkpoint.every=0"])
    assert code == 0, err
    return str(run), task, held, data


@pytest.mark.heavy
def test_a_task_is_tokenized_once_and_ships_smaller_than_its_file(trained, tokenizer, monkeypatch, tmp_path):
    """The driver's check tokenizes each task and the workers score what it shipped (here the --no-ray process,
    whose one load_task is the check's), in trainer.eval and in a training run's [eval]; the shipped form rebuilds
    every choice's ids exactly, in fewer bytes than the task's own file (and than the ids themselves)."""
    import os
    import pickle

    from trainer.eval import suite as evaluation
    from trainer.eval.cli import main as evaluate
    from trainer.eval.multiple_choice import DELIMITER, encode_pair

    run, path, _, _ = trained
    rng = random.Random(2)
    phrase = lambda n: " ".join(f"{rng.choice(NAMES)} likes {rng.choice(WORDS)}" for _ in range(n))  # noqa: E731
    big = path.replace("likes.jsonl", "big.jsonl")
    with open(big, "w") as f:
        for _ in range(200):
            f.write(json.dumps({"query": phrase(6), "choices": [phrase(2) for _ in range(4)], "gold": 1}) + "\n")
    task = load_task(big, tokenizer, max_len=128)
    assert task.requests == [encode_pair(tokenizer, item.query, DELIMITER + choice, 128) for item in read_items(big)
                             for choice in item.choices]
    shipped = len(pickle.dumps(task))
    assert shipped < os.path.getsize(big) and shipped < len(pickle.dumps(task.requests)) / 2
    calls = []
    monkeypatch.setattr(evaluation, "load_task", lambda *a, **k: calls.append(a[0]) or load_task(*a, **k))
    code, _, err = run_captured(evaluate, ["--no-ray", "--checkpoint", run, "--tasks", path])
    assert code == 0 and "likes" in _, err
    assert calls == [path]
    from trainer.__main__ import main as train

    calls.clear()
    code, _, err = run_captured(train, ["--no-ray", *TINY, "--data.path", trained[3], "--run.dir", tmp_path / "run",
                                        "--train.steps=2", "--eval.tasks", path, "--checkpoint.every=0"])
    assert code == 0, err
    assert calls == [path]


@pytest.mark.heavy
def test_a_memorised_task_scores_100_percent_and_the_untrained_model_about_chance(trained):
    run, _, _, _ = trained
    evals = [m for m in metrics(run) if "task/likes/acc" in m]
    assert [m["step"] for m in evals] == [0, 75, 150]
    assert 0.1 <= evals[0]["task/likes/acc"] <= 0.45, "an untrained model picks about 1 in 4"
    assert evals[-1]["task/likes/acc"] == 1.0 and evals[-1]["task/likes/acc_norm"] == 1.0


@pytest.mark.heavy
def test_in_loop_evaluation_reaches_metrics_jsonl_and_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _, _ = trained
    last = metrics(run)[-1]
    for key in ("val_loss", "val_bpb", "eval/heldout/loss", "eval/heldout/bpb", "eval/heldout/loss/words",
                "eval/heldout/bpb/facts", "task/likes/acc", "task/likes/acc_norm"):
        assert key in last, key
    assert last["eval/heldout/loss/facts"] < last["eval/heldout/loss/words"], "the trained source is the easy one"
    events = EventAccumulator(f"{run}/tb").Reload()
    accs = events.Scalars("task/likes/acc")
    assert [e.step for e in accs] == [0, 75, 150] and accs[-1].value == 1.0
    assert "eval/heldout/bpb" in events.Tags()["scalars"]


@pytest.mark.heavy
def test_the_scorer_gives_what_the_loop_logged(trained, tokenizer):
    from trainer.weights import load_weights

    run, task, _, _ = trained
    weights = load_weights(run)
    result = score_task(weights.model(), load_task(task, tokenizer, max_len=weights.cfg.max_seq_len), micro_batch=3,
                        device=torch.device("cpu"))
    assert result["acc"] == 1.0 and all(result["correct"]) and result["items"] == 26


def test_eval_gives_the_same_figures_on_one_and_two_workers(trained, local_ray, tmp_path):
    """A held-out set made by dataprep from two inputs with the run's tokenizer, scored per source, and the task:
    in this process (W=1) and under Ray Train on two workers."""
    from dataprep.__main__ import main as dataprep
    from trainer.eval.cli import main as evaluate

    run, task, _, _ = trained
    for source, docs in (("facts", [line for line in open(task)]), ("words", WORDS * 3)):
        (tmp_path / source).mkdir()
        for i, doc in enumerate(docs):
            (tmp_path / source / f"{i:03d}.txt").write_text(str(doc))
    held = tmp_path / "held"
    code, _, err = run_captured(dataprep, ["--input", tmp_path / "facts", tmp_path / "words", "--output", held,
                                           "--tokenizer", run, "--val-fraction", "1", "--seq-len", "16",
                                           "--workers.local=true"])  # the bytes of the Ray path
    assert code == 0, err
    args = ["--checkpoint", run, "--data.path", held, "--tasks", task, "--run.micro_batch=3", "--out"]
    code, _, err = run_captured(evaluate, ["--no-ray", *args, tmp_path / "w1.json"])
    assert code == 0, err
    code, out, err = run_captured(evaluate, ["--ray.num_workers=2", *args, tmp_path / "w2.json"])  # joins local_ray
    assert code == 0, err
    assert "bits/byte" in out and "likes" in out and "held " in out
    results = {w: json.loads((tmp_path / f"w{w}.json").read_text()) for w in (1, 2)}
    one, two = results[1], results[2]
    assert (one["workers"], two["workers"]) == (1, 2)
    assert set(one["datasets"]["held"]["by_source"]) == {"facts", "words"}
    assert one["tasks"] == two["tasks"] and one["tasks"]["likes"]["acc"] == 1.0
    flat = lambda f: [f["loss"], f["bpb"], f["tokens"], f["bytes"]] + [  # noqa: E731
        v for s in sorted(f["by_source"]) for v in (f["by_source"][s]["loss"], f["by_source"][s]["bpb"])]
    assert np.allclose(flat(one["datasets"]["held"]), flat(two["datasets"]["held"]), rtol=1e-9, atol=0)


@pytest.mark.heavy
def test_a_dataset_of_another_tokenizer_or_a_broken_task_is_refused_before_any_work(trained, tmp_path):
    from trainer.__main__ import main as train
    from trainer.eval.cli import main as evaluate

    run, task, _, data = trained
    other = load_tokenizer(train_tokenizer([f"{w} {w}" for w in WORDS * 30], vocab_size=300, num_threads=1))
    foreign = write_packed_dataset(tmp_path / "foreign", other, {"val": {"x": [" ".join(WORDS)] * 20}}, seq_len=16)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"query": "q", "choices": ["a", "b"], "gold": 5}\n')
    for main, argv in ((evaluate, ["--no-ray", "--checkpoint", run, "--data.path", foreign]),
                       (train, ["--no-ray", *TINY, "--data.path", data, "--run.dir", tmp_path / "r",
                                f"--eval.datasets={foreign}"])):
        code, _, err = run_captured(main, argv)
        assert code == 2 and err.count("\n") == 1 and "was tokenized with another tokenizer" in err, err
    code, _, err = run_captured(evaluate, ["--no-ray", "--checkpoint", run, "--tasks", broken])
    assert code == 2 and "broken.jsonl:1: \"gold\" must be the index" in err, err
    code, _, err = run_captured(evaluate, ["--no-ray", "--data.path", data])
    assert code == 2 and "--checkpoint is required" in err, err
    assert not (tmp_path / "r").exists(), "refused before the run directory was made"


def test_passkey_prompts_fit_their_length_and_plant_the_key_at_its_depth(tokenizer):
    """Each prompt is the longest of whole filler sentences that fits its length with its key; the needle sits at
    its depth; the key continues "The pass key is"; the same seed gives the same prompts."""
    from trainer.eval.passkey import QUESTION, needle, passkey_task

    task = passkey_task(tokenizer, lengths=[200, 400], depths=[0.0, 0.5, 1.0], trials=2, seed=0, max_len=512)
    assert len(task.requests) == 2 * 3 * 2
    sentence = len(tokenizer.encode(["The grass is green. "])[0])
    positions = {}
    for (length, depth), requests in zip([(L, d) for L in (200, 400) for d in (0.0, 0.5, 1.0)],
                                         [task.requests[i:i + 2] for i in range(0, 12, 2)]):
        for ids, n in requests:
            assert length - 2 * sentence <= len(ids) <= length
            text = tokenizer.decode(ids[1:])
            key = tokenizer.decode(ids[-n:]).strip()
            assert len(key) == 5 and key.isdigit() and text.endswith(f"{QUESTION} {key}")
            positions.setdefault((length, depth), []).append(text.index(needle(key)) / len(text))
    for length in (200, 400):
        assert max(positions[(length, 0.0)]) < 0.05 and min(positions[(length, 1.0)]) > 0.5
        assert 0.2 < np.mean(positions[(length, 0.5)]) < 0.6
    again = passkey_task(tokenizer, lengths=[200, 400], depths=[0.0, 0.5, 1.0], trials=2, seed=0, max_len=512)
    assert again.requests == task.requests
    with pytest.raises(ConfigError, match="eval.passkey=600 does not fit the model's context of 512 tokens"):
        passkey_task(tokenizer, lengths=[600], depths=[0.5], trials=1, seed=0, max_len=512)


def test_passkey_scores_a_grid_and_loss_by_position_adds_up(tokenizer, tmp_path):
    """The grid holds every length × depth (its mean is the overall accuracy); the held-out loss by position bucket
    (0-64, 64-128, 128-200) adds up to the whole slice's loss."""
    from trainer.eval.passkey import grid_table, passkey_task, plot_grid, score_passkey

    model = tiny_model(tokenizer.vocab_size, 256)
    task = passkey_task(tokenizer, lengths=[96, 200], depths=[0.0, 1.0], trials=3, seed=0, max_len=256)
    result = score_passkey(model, task, micro_batch=4, device=torch.device("cpu"))
    cells = [acc for row in result["grid"].values() for acc in row.values()]
    assert list(result["grid"]) == ["96", "200"] and list(result["grid"]["96"]) == ["0", "1"]
    assert all(0 <= acc <= 1 for acc in cells) and result["acc"] == pytest.approx(np.mean(cells))
    assert "passkey length" in grid_table(result)
    plot_grid(result, str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"

    text = [" ".join(f"{n} likes {w}." for n, w in zip(NAMES, WORDS * 3))] * 6
    path = write_packed_dataset(tmp_path / "ds", tokenizer, {"train": {"a": text}, "val": {"a": text}}, seq_len=200)
    held = held_out(open_dataset(path), name="ds", token_bytes=tokenizer.token_bytes, rows=0, seed=0, micro_batch=2,
                    rank=0, world=1, by_position=True)
    sums = loss_sums(model, held, torch.device("cpu"))
    got = report(held, sums)
    assert list(got["loss_by_position"]) == ["0-64", "64-128", "128-200"]
    assert torch.allclose(sums[1:].sum(0), sums[0], rtol=1e-9)  # the buckets cover every target once


@pytest.mark.heavy
def test_run_max_seq_len_scores_passkeys_past_the_trained_length(trained):
    """A model whose context is 2,048 tokens (the default the run kept): a passkey length past it is refused in one
    line naming it, and --run.max_seq_len extends the rotary table so the same length is scored."""
    from trainer.eval.cli import main as evaluate

    run, few = trained[0], ["--eval.passkey=2560", "--eval.passkey_depths=0.5", "--eval.passkey_trials=1"]
    code, _, err = run_captured(evaluate, ["--no-ray", "--checkpoint", run, *few])
    assert code == 2 and err.count("\n") == 1, err
    assert "eval.passkey=2560 does not fit the model's context of 2048" in err, err
    code, out, err = run_captured(evaluate, ["--no-ray", "--checkpoint", run, *few, "--run.max_seq_len=2560"])
    assert code == 0, err
    assert out.split("passkey length")[1].splitlines()[1].split()[0] == "2560", out
