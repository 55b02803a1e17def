"""Every bad input ends in one `error:` line naming the file (and line) and exit code 2, with no manifest written.
A mistake in the paths or options is refused on the driver before Ray starts; a bad record is found by a unit's task,
on Ray."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest

from dataprep.__main__ import main
from helpers import run_captured

OPTS = ["--vocab-size", "320", "--seq-len", "16", "--shard-size", "0.001"]
WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river mountain forest ocean desert".split()
GOOD = "".join(
    json.dumps({"text": f"document {i}: " + " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 30))}) + "\n"
    for i in range(200)
)


def run(inputs, output, *extra) -> str:
    """The one `error:` line of a failing run, after checking exit code 2, no traceback and no manifest."""
    code, _, err = run_captured(main, ["--input", *inputs, "--output", output, *OPTS, *extra])
    assert code == 2 and not os.path.exists(os.path.join(str(output), "manifest.json"))
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[:3000]
    return lines[0]


def corpus_with(tmp_path, name: str, data: bytes):
    """A corpus of good documents plus one bad file sorted last, so shards are written before the failure."""
    root = tmp_path / "corpus"
    root.mkdir(exist_ok=True)
    (root / "good.jsonl").write_text(GOOD)
    (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize(
    "name, data, expect",
    [
        ("zz.jsonl", b'{"text": "fine"}\n{not json\n', "zz.jsonl:2: not valid JSON"),
        ("zz.jsonl", b'{"text": "fine"}\n{"body": "x"}\n', "zz.jsonl:2: no string field 'text'"),
        ("zz.jsonl.gz", gzip.compress(GOOD.encode())[:-40] + b"garbage" * 5, "zz.jsonl.gz: cannot read or decompress"),
        ("zz.txt", "caf\u00e9 ok".encode("latin-1"), "zz.txt: invalid UTF-8 at byte 3"),
        ("zz.txt", b"MZ\x90\x00\x03\x00\x00\x00binary", "zz.txt: binary data"),
        ("zz.parquet", b"PAR1 not really parquet", "zz.parquet: not a readable parquet file"),
    ],
    ids=["bad-json", "missing-field", "corrupt-gz", "invalid-utf8", "binary", "corrupt-parquet"],
)
def test_bad_record_is_one_line_naming_the_file(local_ray, tmp_path, name, data, expect):
    out = tmp_path / "ds"
    line = run([corpus_with(tmp_path, name, data)], out)
    assert expect in line
    assert not out.exists(), "a failed run leaves the output as it found it (absent), shards begun or not"


def test_skip_and_replace_are_counted(local_ray, tmp_path):
    root = corpus_with(tmp_path, "zz.jsonl", b'{"text": "fine"}\n{not json\n{"body": 1}\n')
    (root / "latin.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    out = tmp_path / "ds"
    args = ["--input", root, "--output", out, *OPTS, "--on-bad-record", "skip", "--encoding-errors", "replace"]
    code, stdout, _ = run_captured(main, args)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bad_records"] == 2 and manifest["replaced_utf8_documents"] == 1
    assert manifest["documents"] == 200 + 1 + 1
    assert "bad records skipped: 2" in stdout


def test_missing_path(tmp_path):
    assert "does not exist" in run([tmp_path / "nope"], tmp_path / "ds")


def test_empty_corpus(local_ray, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("")
    (tmp_path / "c" / "b.md").write_text("")
    assert "has no text to train a tokenizer" in run([tmp_path / "c"], tmp_path / "ds")


def test_no_readable_files(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "img.png").write_bytes(b"\x89PNG")
    assert "no readable files" in run([tmp_path / "c"], tmp_path / "ds")


def test_unwritable_output(tmp_path):
    root = corpus_with(tmp_path, "b.txt", b"text")
    (tmp_path / "a-file").write_text("x")
    line = run([root], tmp_path / "a-file" / "ds")
    assert "cannot write the output" in line and "a-file" in line


def test_bad_option_values(tmp_path):
    root = corpus_with(tmp_path, "b.txt", b"text")
    assert "pack.seq_len=0 (--seq-len): must be >= 1" in run([root], tmp_path / "ds", "--seq-len", "0")
    assert "pack.val_fraction=2.0 (--val-fraction)" in run([root], tmp_path / "ds", "--val-fraction", "2")
    assert "input.on_bad_record='later' (--on-bad-record)" in run([root], tmp_path / "ds", "--on-bad-record", "later")
    assert "--tokenizer" in run([root], tmp_path / "ds", "--tokenizer", tmp_path / "missing.model")


def test_unreachable_s3_endpoint(local_ray, s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    line = run(["s3://raylm-test/corpus/"], tmp_path / "ds")
    assert "S3 call failed via http://127.0.0.1:9" in line and "AWS_ENDPOINT_URL" in line
    assert "testing" not in line  # no credentials in messages


def test_missing_bucket(local_ray, s3_server, tmp_path):
    line = run(["s3://no-such-bucket-raylm/x"], tmp_path / "ds")
    assert "bucket no-such-bucket-raylm (of s3://no-such-bucket-raylm/x) does not exist" in line, line
    assert not (tmp_path / "ds").exists()


def test_cli_help_and_error_in_a_fresh_process(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "dataprep", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--input", "--output", "--tokenizer", "--vocab-size", "--seq-len", "--val-fraction", "--text-field",
                   "--shard-size", "--num-workers", "--seed", "--on-bad-record", "--encoding-errors", "--max-files",
                   "--overwrite", "--tokenizer-sample-mb", "--pack.unit_mb", "--input.paths", "--tokenizer.sample_file_mb"):
        assert option in help_text
    proc = subprocess.run([sys.executable, "-m", "dataprep", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: input {tmp_path / 'nope'} does not exist; check the path"]
    proc = subprocess.run([sys.executable, "-m", "dataprep", "--seq-len", "abc"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --pack.seq_len='abc' is not a valid int"


def test_an_unrelated_folder_is_refused_and_an_empty_one_left_as_found(local_ray, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    line = run([corpus_with(tmp_path, "a.jsonl", GOOD.encode())], notes)
    assert f"{notes} is not empty and not a raylm dataset (it holds todo.txt)" in line
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    run([corpus_with(tmp_path, "zz.jsonl", b'{"text": "fine"}\n{not json\n')], empty)
    assert list(empty.iterdir()) == []


def test_an_unknown_option_suggests_the_nearest():
    code, _, err = run_captured(main, ["--vocab-szie", "300"])
    assert code == 2 and "did you mean --vocab-size?" in err


def test_a_bad_record_keeps_finished_units_and_the_advice_resumes(local_ray, tmp_path):
    """A bad line in the last of many units: the error says the finished units are kept, and the same command
    with the advice (--on-bad-record skip) reuses them and ends with the bytes of a fresh skip run."""
    from helpers import dataset_files, jsonl_corpus

    jsonl_corpus(tmp_path / "corpus", files=12, lines=25)
    (tmp_path / "corpus" / "zz.jsonl").write_text('{"text": "fine"}\n{not json\n')
    args = ["--input", tmp_path / "corpus", *OPTS, "--pack.unit_mb=0.008", "--num-workers", "1"]
    code, _, err = run_captured(main, [*args, "--output", tmp_path / "ds"])
    assert code == 2 and "zz.jsonl:2: not valid JSON" in err and "kept: running again resumes" in err
    code, out, _ = run_captured(main, [*args, "--output", tmp_path / "ds", "--on-bad-record", "skip"])
    assert code == 0 and int(out.split(" reused")[0].rsplit(", ", 1)[1]) >= 1, out
    assert run_captured(main, [*args, "--output", tmp_path / "fresh", "--on-bad-record", "skip"])[0] == 0
    assert dataset_files(tmp_path / "ds") == dataset_files(tmp_path / "fresh")


def test_chat_data_needs_a_chat_tokenizer_and_jsonl_before_any_work(tmp_path):
    """Refused on the driver before Ray starts: no --tokenizer, a SentencePiece model without raylm's chat markers
    (one trained before chat support), a non-.jsonl input."""
    import io

    import sentencepiece as spm

    from raylm.tokenizer import TRAINER_OPTIONS, train_tokenizer

    chats = tmp_path / "chats"
    chats.mkdir()
    (chats / "a.jsonl").write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    assert "--format chat needs --tokenizer" in run([chats], tmp_path / "ds", "--format", "chat")
    old, lines = io.BytesIO(), GOOD.splitlines() * 3
    options = {k: v for k, v in TRAINER_OPTIONS.items() if k != "control_symbols"}
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=old, vocab_size=320, **options)
    (tmp_path / "old.model").write_bytes(old.getvalue())
    assert "has no chat template" in run([chats], tmp_path / "ds", "--format", "chat", "--tokenizer",
                                         tmp_path / "old.model")
    (tmp_path / "chat.model").write_bytes(train_tokenizer(lines, vocab_size=320, num_threads=1))
    (chats / "b.txt").write_text("plain text")
    assert f"{chats / 'b.txt'} is not a .jsonl file" in run([chats], tmp_path / "ds", "--format", "chat",
                                                            "--tokenizer", tmp_path / "chat.model")
