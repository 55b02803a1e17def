"""Weights and data checked together on the driver, before any worker or directory: a warm start (from a run's
checkpoint or a Hugging Face folder) on data of another tokenizer, a fine-tuning preset with no weights, and the
messages for a checkpoint deleted by retention and a folder that does not exist. All in-process (`--no-ray`)."""

from __future__ import annotations

import json

import pytest

from helpers import JSONL_DOCS, MIXED_DOCS, PARQUET_DOCS, TINY, hf_tokenizer_dir, run_captured, write_packed_dataset
from raylm.tokenizer import load_tokenizer, read_tokenizer_files, train_tokenizer
from trainer.__main__ import main as trainer_main

DOCS = [text for text in MIXED_DOCS.values() if text] + JSONL_DOCS
OTHER_DOCS = DOCS + PARQUET_DOCS
"""Text for a tokenizer of the same size with other tokens (other merges)."""


def lines(docs: list[str]) -> list[str]:
    return [line for text in docs for line in text.split("\n") if line] * 20


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Datasets of DOCS by tokenizer: "base" (480 tokens), "again" (the base tokenizer, other text and fewer rows), "small" (400
    tokens, as the issue's smaller tokenizer) and "other" (480 tokens trained on other text)."""
    root = tmp_path_factory.mktemp("data")
    base = load_tokenizer(train_tokenizer(lines(DOCS), vocab_size=480, num_threads=1))
    tokenizers = {"base": base, "again": base,
                  "small": load_tokenizer(train_tokenizer(lines(DOCS), vocab_size=400, num_threads=1)),
                  "other": load_tokenizer(train_tokenizer(lines(OTHER_DOCS), vocab_size=480, num_threads=1))}
    docs = {"again": DOCS[::-1] * 2}
    return {name: write_packed_dataset(root / name, tok, {"train": {"x": docs.get(name, DOCS * 3)},
                                                          "val": {"x": DOCS}}, seq_len=32)
            for name, tok in tokenizers.items()}


def train(data_path: str, run_dir, *args) -> tuple[int, str, str]:
    return run_captured(trainer_main, ["--no-ray", *TINY, "--train.eval_rows=0", "--data.path", data_path,
                                       "--run.dir", run_dir, *args])


@pytest.fixture(scope="module")
def source(data, tmp_path_factory) -> str:
    """A 3-step run on the base dataset saving every step and keeping 2: step 1 was deleted by retention."""
    run_dir = tmp_path_factory.mktemp("runs") / "source"
    code, _, err = train(data["base"], run_dir, "--train.steps=3", "--checkpoint.every=1", "--checkpoint.keep=2",
                         "--checkpoint.async_save=false")
    assert code == 0, err
    return str(run_dir)


def one_error(code: int, out: str, err: str) -> str:
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), (code, out, err)
    return err


def test_a_warm_start_on_data_of_another_tokenizer_is_one_line_before_anything_is_made(data, source, tmp_path):
    """Today a tokenizer of the same size trains without a word, a smaller one fails in the loop, after the run
    directory was made. Now both stop on the driver, naming both tokenizers and how to remake the data."""
    warm = [f"--checkpoint.resume_from={source}", "--checkpoint.load_weights_only=true", "--train.steps=1"]
    for name in ("other", "small"):
        err = one_error(*train(data[name], tmp_path / name, *warm))
        assert f"dataset {data[name]} was made with another tokenizer (sentencepiece tokenizer of {400 if name == 'small' else 480} tokens" in err, err
        assert f"than the weights of --checkpoint.resume_from={source} were trained with (sentencepiece tokenizer of 480 tokens" in err, err
        assert err.rstrip().endswith(f"python -m dataprep --tokenizer {source} ...")
        assert not (tmp_path / name).exists()
    code, _, err = train(data["again"], tmp_path / "again", *warm)  # the same tokenizer, other text: trains
    assert code == 0 and err.count("warm start from the weights of") == 1, err


def test_a_full_resume_from_another_run_is_checked_on_the_driver(data, source, tmp_path):
    """checkpoint.resume_from without load_weights_only continues the other run: its dataset must be the same,
    refused before the run directory exists."""
    err = one_error(*train(data["again"], tmp_path / "cont", f"--checkpoint.resume_from={source}", "--train.steps=4"))
    assert "dataset train rows=" in err and "resume from a checkpoint of this model, dataset and data order" in err
    assert not (tmp_path / "cont").exists()


def test_init_from_hf_on_data_of_another_tokenizer_is_refused(data, source, tmp_path):
    """The issue's case: `--init.from_hf=hf/demo` (an export of a run, with its tokenizer) on data of a smaller
    tokenizer trained without a word. The folder's own tokenizer is compared with the dataset's."""
    pytest.importorskip("transformers")
    from trainer.export import main as export_main

    folder = tmp_path / "hf"
    assert run_captured(export_main, ["--checkpoint", source, "--out", folder])[0] == 0
    for name in ("small", "other"):
        err = one_error(*train(data[name], tmp_path / name, f"--init.from_hf={folder}", "--train.steps=1"))
        assert f"than the weights of --init.from_hf={folder} were trained with" in err
        assert f"python -m dataprep --tokenizer {folder} ..." in err
        assert not (tmp_path / name).exists()
    code, _, err = train(data["again"], tmp_path / "again", f"--init.from_hf={folder}", "--train.steps=1")
    assert code == 0, err


def test_the_same_vocabulary_in_other_files_is_the_same_tokenizer(tmp_path):
    """The rule (`same_vocabulary`): equal files, or the same token string at every id. A Hugging Face tokenizer
    with another chat template is the same vocabulary; one trained on other text is not."""
    from trainer.weights import same_vocabulary

    folder = hf_tokenizer_dir(tmp_path / "tok", lines(DOCS))
    files = read_tokenizer_files(folder)
    config = json.loads(files["tokenizer_config.json"])
    retemplated = {**files, "tokenizer_config.json": json.dumps({**config, "chat_template": "{{ 'x' }}"}).encode()}
    other = read_tokenizer_files(hf_tokenizer_dir(tmp_path / "other", lines(OTHER_DOCS)))
    a, b, c = (load_tokenizer(f) for f in (files, retemplated, other))
    assert a.sha256 != b.sha256 and same_vocabulary(a, b)
    assert a.vocab_size == c.vocab_size and not same_vocabulary(a, c)


def test_a_fine_tuning_preset_refuses_random_weights_unless_asked(data, tmp_path):
    """configs/sft-*.toml without weights trained from random ones (val 9.03 at step 0); now one line before
    anything is made, and --init.random=true is the explicit way to do it."""
    from raylm.config import load_config
    from trainer.job import JobConfig

    for preset in ("sft-demo", "sft-llama3-8b"):
        code, out, err = run_captured(trainer_main, ["--no-ray", "--config", f"configs/{preset}.toml", "--data.path",
                                                     data["base"], "--run.dir", tmp_path / preset,
                                                     "--train.steps=1"])
        err = one_error(code, out, err)
        assert "init.weights_required = true" in err and "--init.random=true" in err and "--init.from_hf" in err
        assert not (tmp_path / preset).exists()
    assert load_config(JobConfig, "configs/sft-demo.toml", ["--init.random=true"]).init.random
    assert load_config(JobConfig, "configs/sft-demo.toml", ["--init.from_hf=hf"]).init.from_hf == "hf"
    code, out, err = run_captured(trainer_main, ["--no-ray", "--config", "configs/sft-demo.toml", "--init.random=true",
                                                 "--checkpoint.resume_from=runs/demo"])
    assert "--init.random=true starts from random weights but --checkpoint.resume_from=runs/demo" in one_error(
        code, out, err)


def test_a_step_deleted_by_retention_and_a_missing_folder_say_so(data, source, tmp_path):
    err = one_error(*train(data["base"], tmp_path / "run", f"--checkpoint.resume_from={source}/checkpoints/step-000001"))
    assert f"checkpoint {source}/checkpoints/step-000001 does not exist (a run keeps its newest checkpoint.keep " \
           f"checkpoints and deletes older ones); {source} holds step 2, 3: pick one of them, or pass {source} for " \
           "its newest" in err, err
    missing = tmp_path / "no-such-folder"
    err = one_error(*train(data["base"], tmp_path / "run", f"--init.from_hf={missing}"))
    assert err == f"error: {missing} does not exist; pass a Hugging Face model folder (config.json and safetensors)\n"
    assert not (tmp_path / "run").exists()


def test_generate_help_shows_each_default_once():
    from trainer.generate import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "(default: None)" not in text and text.count("(default: the checkpoint's)") == 1
    assert "tokens to generate (default: 64)" in text


@pytest.mark.heavy
def test_a_warm_start_is_announced_once_by_a_job_of_two_ranks(data, source, tmp_path):
    """Every rank logged "warm start from the weights of …" (twice from two Ray workers); now rank 0 alone does, as
    for "resumed from". Two torchrun ranks, as Ray Train's workers, each with its own log handler."""
    import os
    import subprocess
    import sys

    from raylm.ray_session import free_port

    argv = ["--no-ray", *TINY, "--train.eval_rows=0", "--data.path", data["base"], "--run.dir", str(tmp_path / "run"),
            f"--checkpoint.resume_from={source}", "--checkpoint.load_weights_only=true", "--train.steps=1"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "-m", "trainer", *argv], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warm start from the weights of") == 1, proc.stderr


def test_a_run_extends_another_runs_context_with_rope_scaling_and_document_masking(data, source, tmp_path):
    """Context extension: the 32-token run's weights continue at 64 tokens with YaRN (and document masking), on a
    dataset made at the longer length; the run's checkpoints record the scaling, so a re-run with another one is
    refused in one line."""
    base = load_tokenizer(read_tokenizer_files(data["base"]))
    long = write_packed_dataset(tmp_path / "long", base, {"train": {"x": DOCS * 3}, "val": {"x": DOCS}}, seq_len=64)
    extend = ["--checkpoint.resume_from", source, "--checkpoint.load_weights_only=true", "--model.rope_scaling=yarn",
              "--model.rope_factor=2", "--model.rope_original_max_seq_len=32", "--model.doc_mask=true",
              "--train.steps=2", "--checkpoint.async_save=false"]
    code, _, err = train(long, tmp_path / "extended", *extend)
    assert code == 0, err
    state = json.loads(next((tmp_path / "extended" / "checkpoints").glob("step-*/train_state.json")).read_text())
    assert state["identity"]["dataset seq_len"] == 64 and state["identity"]["model.rope_scaling"] == "yarn"
    assert state["identity"]["model.rope_factor"] == 2.0 and state["identity"]["model.doc_mask"] is True
    code, out, err = train(long, tmp_path / "extended", *extend[:-6], "--model.rope_scaling=linear",
                           "--model.rope_factor=2", "--train.steps=3")
    assert "model.rope_scaling=yarn" in one_error(code, out, err) and "model.rope_scaling=linear" in err
