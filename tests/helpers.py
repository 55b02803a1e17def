"""What several test modules use: small corpora, CLI runners, the tiny trainer preset and readers of a run's
outputs. Fixtures live in conftest.py; test modules import these from here, never from each other."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import time
from typing import Callable

import pytest

from raylm import storage


ON_S3 = pytest.param("s3", marks=(pytest.mark.s3, pytest.mark.slow))
"""The "s3" param of a fixture that asks for `s3_server` by name as it runs (`request.getfixturevalue`), which the
tiering in conftest.py cannot see from the test's fixtures: it carries the markers itself."""


def driver_env(address: str) -> dict:
    """Environment of a subprocess driver joining the Ray at `address` (one thread per process, as on 2 cores)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": address}


def upload_dir(local_dir, url: str) -> None:
    """Copy a local directory tree to an s3:// prefix."""
    for root, _, names in os.walk(local_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir)
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(url, rel), f.read())


MIXED_DOCS = {
    "notes/a.txt": "Hello world.\nSecond line, with  two spaces and a tab\there.\n",
    "notes/cjk.md": "# 标题\n\n日本語のテキストと한국어 문장. Emoji: 🎉🚀👩‍💻 and the marker ▁ itself.\n",
    "code/mod.py": "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n    pass\n",
    "code/empty.py": "",
}
JSONL_DOCS = [f"json document {i}: the quick brown fox {'jumps ' * (i % 7)}over the lazy dog {i}." for i in range(40)]
PARQUET_DOCS = [f"parquet row {i} — naïve café résumé, 数字 {i * 17}" for i in range(30)]


def write_mixed_corpus(root) -> list[str]:
    """A small corpus of every supported format; returns its documents in raylm's corpus order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = {}
    for rel, text in MIXED_DOCS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        if text:
            docs[str(path)] = [text]
    lines = "".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(JSONL_DOCS))
    (root / "data").mkdir()
    (root / "data" / "part1.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    docs[str(root / "data" / "part1.jsonl.gz")] = JSONL_DOCS
    (root / "data" / "part2.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    docs[str(root / "data" / "part2.jsonl.zst")] = JSONL_DOCS
    pq.write_table(pa.table({"text": PARQUET_DOCS}), root / "data" / "rows.parquet")
    docs[str(root / "data" / "rows.parquet")] = PARQUET_DOCS
    (root / "data" / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    return [d for path in sorted(docs) for d in docs[path]]


def jsonl_corpus(root, files: int, lines: int) -> None:
    """`files` .jsonl files of `lines` short documents each, made of a few words (a quick tokenizer's corpus)."""
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river mountain forest ocean".split()
    root.mkdir()
    for f in range(files):
        docs = (f"doc {f}.{i}: " + " ".join(words[(f + i * k) % len(words)] for k in range(40)) for i in range(lines))
        (root / f"part-{f:03d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def run_captured(main, argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of an in-process CLI run under `run_cli`.

    Plain StringIO buffers instead of capsys: Ray binds log handlers to the sys.stderr current when it sets them
    up, and capsys closes its buffer when the test ends, so a later Ray log line would hit a closed file.
    """
    import contextlib
    import io

    from raylm.cli import run_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(main, [str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


TINY = ["--config", "configs/tiny.toml", "--train.global_batch=8", "--train.micro_batch=2", "--optim.lr=3e-3",
        "--optim.warmup_steps=5", "--train.sample_prompt=", "--train.eval_rows=16"]


def metrics(run_dir: str) -> list[dict]:
    """The run's metrics lines, as every reader reads them (local metrics.jsonl or the segments on s3://)."""
    from trainer.metrics import read_metrics

    return read_metrics(run_dir)


def trainer_cli(*args, torchrun: int = 0) -> subprocess.CompletedProcess:
    """`python -m trainer --no-ray` at the TINY size with `args`, in a process of its own (under torchrun with
    `torchrun` ranks)."""
    import sys

    from raylm.ray_session import free_port

    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
                "--master_port", str(free_port()), "-m", "trainer"] if torchrun else [sys.executable, "-m", "trainer"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "--no-ray", *TINY, *args], capture_output=True, text=True, env=env, timeout=600)


def losses(run_dir: str) -> list[float]:
    return [m["loss"] for m in metrics(run_dir) if "loss" in m]


STUDY = [*TINY, "--tune.batch=8,16", "--tune.budget_tokens=20480", "--tune.marks=4", "--ray.num_workers=1"]
"""A small study: 64-token rows, 8 sequences = 512 tokens a step; 4 marks of 5,120 tokens (10 steps at batch 8, 5
at batch 16)."""


def within(a: list[float], b: list[float], rel: float = 1e-5) -> bool:
    return len(a) == len(b) and max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= rel


def dataset_files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen | None = None, timeout: float = 300,
             every: float = 0.2) -> None:
    """Poll `ready` every `every` seconds until it holds (while `proc`, if given, runs); fail naming `what` if the
    process ends or `timeout` runs out. Tests wait on the condition itself, never for a guessed time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        if ready():
            return
        time.sleep(every)
    ended = "" if proc is None or proc.poll() is None else f": the process ended first (exit code {proc.poll()})"
    raise AssertionError(f"{what} never came within {timeout:g} s{ended}")


def logged_steps(run_dir: str) -> list[dict]:
    """The run's training lines of metrics so far (none before the first)."""
    return [m for m in metrics(run_dir) if "loss" in m]


INSTRUCTION_WORDS = "apple river stone cloud green happy table light music ocean paper tiger".split()


def instruction_task(root, *, conversations: int = 3000, held_out: int = 100) -> list[tuple[str, str]]:
    """A synthetic instruction task under `root`: corpus/ (pretraining text: sentences of the task's words), chat/
    (`conversations` in both record forms, half with a system message) and the held-out (prompt, answer) pairs
    returned, prompts no training conversation has. Tasks: the first or last word of a list, or the two words of a
    pair swapped."""
    import random

    rng = random.Random(0)
    glue = "first last swap the word words of".split()
    (root / "corpus").mkdir(parents=True)
    (root / "chat").mkdir()
    text = (" ".join(rng.choice(INSTRUCTION_WORDS + glue) for _ in range(rng.randint(5, 15))) + "." for _ in range(4000))
    (root / "corpus" / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in text))

    def task(words: tuple[str, ...]) -> tuple[str, str]:
        kind = rng.choice(["first", "last", "swap"])
        if kind == "swap":
            return f"swap the words: {words[0]} {words[1]}", f"{words[1]} {words[0]}"
        return f"{kind} word of: {' '.join(words)}", words[0] if kind == "first" else words[-1]

    def sample() -> tuple[str, str]:
        return task(tuple(rng.sample(INSTRUCTION_WORDS, rng.randint(2, 5))))

    held: dict[str, str] = {}
    while len(held) < held_out:
        held.setdefault(*sample())
    lines = []
    while len(lines) < conversations:
        prompt, answer = sample()
        if prompt in held:
            continue
        record = {"prompt": prompt, "response": answer} if len(lines) % 2 else {"messages": [
            {"role": "system", "content": "Follow the instruction."}, {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer}]}
        lines.append(json.dumps(record) + "\n")
    (root / "chat" / "train.jsonl").write_text("".join(lines))
    return list(held.items())


def preference_task(root, *, sft: int = 2000, pairs: int = 1000, held_out: int = 60) -> list[tuple[str, str]]:
    """A synthetic preference task under `root`: corpus/ (text of the task's words, for a tokenizer), chat/ (`sft`
    conversations whose reply is the right word half the time and the other end of the list otherwise: a model
    tuned on them answers a held-out prompt right about half the time), pairs/ (`pairs` prompts with the right word
    chosen and the wrong end rejected, in the string form) and the held-out (prompt, answer) pairs returned, prompts
    no training record has. Task: the first or last word of a list."""
    import random

    rng = random.Random(0)

    def sample() -> tuple[str, str, str]:
        words = rng.sample(INSTRUCTION_WORDS, rng.randint(2, 5))
        kind = rng.choice(["first", "last"])
        right, wrong = (words[0], words[-1]) if kind == "first" else (words[-1], words[0])
        return f"{kind} word of: {' '.join(words)}", right, wrong

    held: dict[str, str] = {}
    while len(held) < held_out:
        prompt, right, _ = sample()
        held.setdefault(prompt, right)
    records: dict[str, list[dict]] = {"chat": [], "pairs": []}
    for kind, count in (("chat", sft), ("pairs", pairs)):
        while len(records[kind]) < count:
            prompt, right, wrong = sample()
            if prompt in held:
                continue
            records[kind].append({"prompt": prompt, "response": right if rng.random() < 0.5 else wrong}
                                 if kind == "chat" else {"prompt": prompt, "chosen": right, "rejected": wrong})
    text = [" ".join(rng.choice(INSTRUCTION_WORDS + "first last word of".split()) for _ in range(rng.randint(5, 15)))
            + "." for _ in range(2000)]
    for kind, lines in (("corpus", [{"text": t} for t in text]), *records.items()):
        (root / kind).mkdir(parents=True)
        (root / kind / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return list(held.items())


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
"""Llama-3-Instruct's chat template (its special tokens, header and `trim`), minus the date/tool handling."""
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
"""Llama-3's pre-tokenizer pattern: a run of newlines is one piece whatever follows it."""


def hf_tokenizer_dir(root, lines: list[str], *, vocab_size: int = 400) -> str:
    """A Hugging Face tokenizer folder as published Llama-3 models have: a byte-level BPE `tokenizer.json` (lossless
    on any text) trained on `lines` with `tokenizers`, and `tokenizer_config.json` naming BOS/EOS and the chat
    template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    root.mkdir(parents=True)
    tok.save(str(root / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_TEMPLATE,
              "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return str(root)


def write_packed_dataset(root, tokenizer, splits: dict[str, dict[str, list[str]]], *, seq_len: int) -> str:
    """A finished raylm dataset made in this process (dataprep would start Ray), recording sources as dataprep
    does: each split is {source: documents}; each source's documents are tokenized, closed by EOS, packed end to end
    into rows of seq_len + 1 of its own (the partial last row dropped) in a shard of its own."""
    import numpy as np

    from raylm.dataset import FORMAT, FORMAT_VERSION, MANIFEST, rows_per_batch
    from raylm.shard_writer import ShardWriter
    from raylm.tokenizer import token_dtype, write_tokenizer_files

    root.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    names = sorted({source for docs in splits.values() for source in docs})
    entries = {}
    for split, by_source in splits.items():
        shards = []
        for source, docs in sorted(by_source.items()):
            stream = np.array([t for ids in tokenizer.encode(docs) for t in ids + [tokenizer.eos_id]])
            rows = stream[:len(stream) // (seq_len + 1) * (seq_len + 1)].astype(dtype).reshape(-1, seq_len + 1)
            writer = ShardWriter(str(root), f"{split}/{source}-000.arrow", dtype, seq_len + 1)
            writer.write(rows)
            shards.append({**writer.close(), "source": names.index(source)})
        entries[split] = {"shards": shards, "rows": sum(s["rows"] for s in shards),
                          "tokens": sum(s["rows"] for s in shards) * (seq_len + 1)}
    write_tokenizer_files(tokenizer.files, str(root))
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "seq_len": seq_len, "row_len": seq_len + 1,
                "dtype": dtype.name, "rows_per_batch": rows_per_batch(seq_len + 1, dtype), "seed": 0,
                "splits": entries, "tokenizer": tokenizer.describe(), "source_names": names}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return str(root)
