"""Chat rows carry loss: a conversation whose prompt leaves no room in a row for a reply token is dropped and counted
(`no_reply`), under either --pack.overlong, so no written row is trained on for nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dataprep.shards import ExamplePacker
from helpers import run_captured
from trainer.loss import unpack

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river mountain forest ocean".split()


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_an_example_without_a_target_in_its_row_is_dropped_and_counted(tmp_path, overlong):
    """Rows of 10 positions: a prompt of exactly 10 tokens (its reply starts at the 11th) leaves no room; a prompt of
    9 leaves one reply token (kept when truncating)."""
    examples = {"fits": ([5] * 4, [False, False, True, True]),
                "no room": ([6] * 12, [False] * 10 + [True] * 2),
                "one reply token": ([7] * 12, [False] * 9 + [True] * 3),
                "no reply at all": ([8] * 3, [False] * 3)}
    packer = ExamplePacker(str(tmp_path), "r", 10, 100, np.dtype(np.uint16), pad_id=2, overlong=overlong)
    for tokens, loss in examples.values():
        packer.add(tokens, loss)
    entry = packer.finish()
    assert entry["no_reply"] == 2 and entry["documents"] == (2 if overlong == "truncate" else 1)
    assert (entry["truncated"], entry["dropped"]) == ((1, 0) if overlong == "truncate" else (0, 1))
    assert entry["dropped_tokens"] == 12 + 3 + (2 if overlong == "truncate" else 12)


def chats(folder, *, long_prompt_words: int) -> None:
    """Twelve short conversations and one whose user message is `long_prompt_words` words."""
    lines = [{"prompt": f"what follows {WORDS[i % 15]}?", "response": f"{WORDS[(i + 1) % 15]} and more"}
             for i in range(12)]
    lines.insert(5, {"prompt": " ".join(WORDS[i % 15] for i in range(long_prompt_words)), "response": "yes"})
    folder.mkdir()
    (folder / "chats.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_dataprep_drops_a_conversation_whose_prompt_fills_the_row(tmp_path, overlong):
    """End to end without Ray: counted in the manifest and the summary, and every written row has a loss token."""
    from dataprep.__main__ import main
    from raylm.dataset import open_dataset
    from raylm.tokenizer import train_tokenizer

    text = [" ".join(WORDS[(i * k) % 15] for k in range(1, 20)) for i in range(200)] + ["what follows and more?"] * 20
    (tmp_path / "chat.model").write_bytes(train_tokenizer(text, vocab_size=320, num_threads=1))
    chats(tmp_path / "chats", long_prompt_words=60)
    code, out, err = run_captured(main, ["--format", "chat", "--input", tmp_path / "chats", "--tokenizer",
                                         tmp_path / "chat.model", "--output", tmp_path / "ds", "--seq-len", "48",
                                         "--val-fraction", "0", "--pack.overlong", overlong, "--workers.local=true"])
    assert code == 0, err
    split = open_dataset(str(tmp_path / "ds")).train
    _, _, weights = unpack(torch.from_numpy(split.rows(range(len(split))).astype(np.int64)))
    assert len(split) >= 1 and weights.sum(1).min() >= 1
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert (train["no_reply"], train["documents"], train["truncated"], train["dropped"]) == (1, 12, 0, 0)
    assert "train: 12 conversations" in out and "1 dropped: no room for a reply" in out, out
