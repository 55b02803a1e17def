"""`python -m trainer.size` sizes the model the trainer builds: the same arguments, the dataset's vocabulary and
sequence length; without a dataset it says what it assumed."""

from __future__ import annotations

import re

from helpers import jsonl_corpus, run_captured


def test_size_on_a_dataset_is_the_parameter_count_of_the_trained_model(tmp_path):
    from dataprep.__main__ import main as dataprep
    from trainer.__main__ import main as trainer
    from trainer.size import main as size
    from trainer.weights import load_weights

    jsonl_corpus(tmp_path / "corpus", files=2, lines=40)
    code, _, err = run_captured(dataprep, ["--input", tmp_path / "corpus", "--output", tmp_path / "ds", "--vocab-size",
                                           "320", "--seq-len", "32", "--val-fraction", "0", "--workers.local=true"])
    assert code == 0, err
    job = ["--config", "configs/demo.toml", "--data.path", str(tmp_path / "ds")]
    code, out, err = run_captured(size, job)
    assert code == 0, err
    counted = int(re.search(r"total \(([\d,]+)\)", out)[1].replace(",", ""))
    assert "(vocab 320)" in out and "at seq_len 32:" in out and "vocab 320 and seq 32 from the dataset" in out, out

    code, _, err = run_captured(trainer, ["--no-ray", *job, "--run.dir", str(tmp_path / "run"), "--train.steps=1",
                                          "--train.global_batch=2", "--train.micro_batch=2", "--train.eval_every=0",
                                          "--train.eval_rows=0", "--train.sample_prompt="])
    assert code == 0, err
    trained = load_weights(str(tmp_path / "run")).model()
    assert counted == sum(p.numel() for p in trained.parameters())


def test_size_without_a_dataset_says_what_it_assumed(tmp_path, monkeypatch):
    """From a directory with no data/stdlib: the preset's vocabulary and context, named as assumed. A --data.path
    that holds no dataset is the trainer's one-line error."""
    from trainer.size import main as size
    import pathlib

    configs = pathlib.Path("configs/demo.toml").absolute()
    monkeypatch.chdir(tmp_path)
    code, out, err = run_captured(size, ["--config", str(configs), "--model.vocab_size=1000"])
    assert code == 0, err
    assert "(vocab 1,000)" in out and "assumed: vocab 1,000 (model.vocab_size) and seq 2,048" in out, out
    code, _, err = run_captured(size, ["--config", str(configs), "--data.path", str(tmp_path / "none")])
    assert code == 2 and "no manifest.json" in err
