"""EleutherAI's lm-evaluation-harness on raylm models (trainer.harness): a task's accuracy through lm-eval equals
raylm's own multiple-choice scorer's item by item, and rolling log-likelihoods and generations equal what the model
computes directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raylm.errors import ConfigError
from raylm.tokenizer import load_tokenizer, train_tokenizer
from trainer.eval.multiple_choice import load_task, score_requests, score_task
from trainer.model.config import ModelConfig
from trainer.model.generation import generate
from trainer.model.transformer import Transformer
from trainer.weights import Weights, save_weights

from lm_eval.api.instance import Instance
from trainer.eval import harness

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river mountain forest ocean "
         "north south meadow stone").split()
CPU = torch.device("cpu")
MAX_LEN = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A random-init raylm weights file with its tokenizer: accuracy is near chance, which is enough to compare."""
    rng = np.random.default_rng(0)
    sp = train_tokenizer([" ".join(rng.choice(WORDS, 12)) for _ in range(300)], vocab_size=300, num_threads=1)
    cfg = ModelConfig(vocab_size=load_tokenizer(sp).vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden=128, max_seq_len=MAX_LEN)
    model = Transformer(cfg)
    model.init_weights(5)
    path = str(tmp_path_factory.mktemp("weights") / "w.pt")
    save_weights(path, Weights(cfg, model.state_dict(), {"tokenizer.model": sp}))
    return path


@pytest.fixture(scope="module")
def lm(checkpoint) -> harness.RaylmLM:
    return harness.RaylmLM(checkpoint, batch_size=3, device="cpu")


def write_task(folder: Path, name: str, items: int = 20) -> Path:
    """A multiple-choice task in raylm's .jsonl form and the lm-eval YAML that reads the same file."""
    rng = np.random.default_rng(1)
    lines = []
    for i in range(items):
        query = " ".join(rng.choice(WORDS, 5)) + (" " if i % 4 == 0 else "")  # lm-eval moves trailing spaces too
        choices = ["-".join(rng.choice(WORDS, rng.integers(1, 4))) for _ in range(4)]
        lines.append(json.dumps({"query": query, "choices": choices, "gold": int(rng.integers(4))}))
    data = folder / f"{name}.jsonl"
    data.write_text("\n".join(lines) + "\n")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    return data


@pytest.mark.heavy
def test_cli_accuracy_equals_raylms_scorer_item_by_item(tmp_path, checkpoint, lm):
    """The user's command, offline: every choice's log-likelihood, hence every item's verdict, is raylm's own."""
    data = write_task(tmp_path, "raylm_mc")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "127.0.0.1:1"}
    proc = subprocess.run([sys.executable, "-m", "trainer.harness", "--model", "raylm", "--model_args",
                           f"checkpoint={checkpoint},batch_size=3,device=cpu", "--include_path", str(tmp_path),
                           "--tasks", "raylm_mc", "--log_samples", "--output_path", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,), (samples,) = (list((tmp_path / "out").rglob(p)) for p in ("results_*.json", "samples_*.jsonl"))
    metrics = json.loads(results.read_text())["results"]["raylm_mc"]
    docs = sorted(map(json.loads, samples.read_text().splitlines()), key=lambda s: s["doc_id"])

    task = load_task(str(data), lm.tokenizer, max_len=MAX_LEN)
    ours = score_task(lm.model, task, micro_batch=3, device=CPU)
    assert (metrics["acc,none"], metrics["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])
    assert [doc["acc"] == 1.0 for doc in docs] == ours["correct"]
    theirs = [float(ll) for doc in docs for ll, _ in doc["filtered_resps"]]  # logged as repr strings: exact
    assert theirs == score_requests(lm.model, task.requests, micro_batch=3, device=CPU)[:, 0].tolist()
    assert 0 < sum(ours["correct"]) < len(docs) and ours["acc"] != ours["acc_norm"], "the task compares nothing"


def direct_log_prob(model: Transformer, ids: list[int], eos_id: int) -> float:
    """log P(ids | EOS), each token predicted once with up to max_seq_len tokens before it: chunks of max_seq_len
    predictions, each read through the max_seq_len tokens that end where the chunk ends."""
    seq, width, total = [eos_id] + ids, model.cfg.max_seq_len, 0.0
    for first in range(1, len(seq), width):
        last = min(first + width, len(seq))  # predicts seq[first:last]
        start = max(0, last - 1 - width)
        with torch.no_grad():
            logits, _ = model(torch.tensor([seq[start:last - 1]]))
        logprobs = torch.log_softmax(logits[0].double(), -1).gather(1, torch.tensor(seq[start + 1:last])[:, None])
        total += logprobs[first - 1 - start:].sum().item()
    return total


def test_rolling_loglikelihood_is_the_texts_log_probability(lm):
    short = "alpha beta gamma"
    long = " ".join(np.random.default_rng(2).choice(WORDS, 60))  # several windows of max_seq_len
    n_long = len(lm.tokenizer.encode([long])[0])
    assert n_long > 3 * MAX_LEN, n_long
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in (short, long, "")])
    want = [direct_log_prob(lm.model, lm.tokenizer.encode([t])[0], lm.tokenizer.eos_id) for t in (short, long)]
    assert got == pytest.approx(want + [0.0], rel=1e-5)


def test_generate_until_is_greedy_generation_cut_at_the_first_stop(lm):
    tok, max_new = lm.tokenizer, 12
    context, overlong = "alpha beta", " ".join(WORDS * 2)  # the second keeps its last tokens only

    def greedy(text: str) -> str:
        prompt = ([tok.eos_id] + tok.encode([text])[0])[-(MAX_LEN - max_new):]
        return tok.decode(generate(lm.model, prompt, max_new, eos_id=tok.eos_id)[len(prompt):])

    full = greedy(context)
    assert len(full) >= 4, f"the model stops at once ({full!r}); the cut is not exercised"
    stop = full[len(full) // 2:len(full) // 2 + 2]
    gen = {"max_gen_toks": max_new, "do_sample": False, "temperature": 0.0}
    requests = [(context, {**gen, "until": ["\x00never"]}), (context, {**gen, "until": ["\x00never", stop]}),
                (overlong, {**gen, "until": []})]
    got = lm.generate_until([Instance("generate_until", {}, args, 0) for args in requests])
    assert got == [full, full[:full.index(stop)], greedy(overlong)]


def test_model_args_and_generation_settings_it_cannot_honour_are_refused(checkpoint, lm):
    cli_defaults = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}  # what lm-eval's CLI passes
    made = harness.RaylmLM.create_from_arg_obj({"checkpoint": checkpoint, "batch_size": 4}, cli_defaults)
    assert made.batch_size == 4
    if not torch.cuda.is_available():
        assert made.device == CPU
    with pytest.raises(ConfigError, match="unknown checkpont"):
        harness.RaylmLM.create_from_arg_obj({"checkpont": checkpoint}, cli_defaults)
    with pytest.raises(ConfigError, match="has no 'auto'"):
        harness.RaylmLM.create_from_arg_obj({"checkpoint": checkpoint}, {**cli_defaults, "batch_size": "auto"})
    with pytest.raises(ConfigError, match="dtype='float16' for raylm: it takes float32 or bfloat16"):
        harness.RaylmLM.create_from_arg_obj({"checkpoint": checkpoint, "dtype": "float16"}, cli_defaults)
    bf16 = harness.RaylmLM.create_from_arg_obj({"checkpoint": checkpoint, "dtype": "bfloat16"}, cli_defaults)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="num_beams"):
        lm.generate_until([Instance("generate_until", {}, ("alpha", {"until": [], "num_beams": 4}), 0)])


def test_without_lm_eval_the_cli_says_how_to_install_it():
    hide = ("import runpy, sys\n"  # an import of lm_eval fails as it does where it is not installed
            "class Absent:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.partition('.')[0] == 'lm_eval':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Absent())\n"
            "runpy.run_module('trainer.harness', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", hide, "--model", "raylm", "--tasks", "hellaswag"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {harness.MISSING}", proc.stderr
