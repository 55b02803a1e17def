"""Preference data (`python -m dataprep --format preference`): each pair's chosen and rejected replies rendered as
fine-tuning renders a conversation, loss on the final reply alone, both examples in one row as examples 2j+1 and
2j+2; the three ways of writing a pair give the same rows; bad pairs stop the run naming their line, or are counted
and skipped. In-process without Ray (`--workers.local=true`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dataprep.chat import tokenize
from dataprep.sources import Record
from helpers import run_captured
from raylm.chat_template import reply_end
from raylm.dataset import PackedDataset, open_dataset
from raylm.tokenizer import load_tokenizer, train_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river mountain forest ocean".split()
SEQ_LEN = 255
"""Rows of 256 positions: two to four of the pairs below per row."""


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> str:
    """A raylm SentencePiece tokenizer (raylm's chat template) that knows the words of the pairs."""
    text = [" ".join(WORDS[(i * k) % 15] for k in range(1, 20)) for i in range(200)] + ["what follows and more?"] * 20
    path = tmp_path_factory.mktemp("tok") / "chat.model"
    path.write_bytes(train_tokenizer(text, vocab_size=320, num_threads=1))
    return str(path)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def pair(i: int) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen, rejected) of pair i; every third prompt has an earlier exchange, its assistant
    turn context that carries no loss."""
    prompt = [user(f"what follows {WORDS[i % 15]} {WORDS[i // 15]}?")]
    if i % 3 == 0:
        prompt = [user("name a river"), assistant(f"{WORDS[(i + 4) % 15]} river"), *prompt]
    return prompt, f"{WORDS[(i + 1) % 15]} and more", " ".join(WORDS[(i + k) % 15] for k in range(2, 3 + i % 4))


def lines(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def as_string(i: int) -> dict:
    prompt, chosen, rejected = pair(i)
    assert len(prompt) == 1
    return {"prompt": prompt[0]["content"], "chosen": chosen, "rejected": rejected}


def as_messages(i: int) -> dict:
    prompt, chosen, rejected = pair(i)
    return {"prompt": prompt, "chosen": assistant(chosen), "rejected": [assistant(rejected)]}


def as_conversations(i: int) -> dict:
    """TRL's conversational form: two conversations sharing the prompt."""
    prompt, chosen, rejected = pair(i)
    return {"chosen": [*prompt, assistant(chosen)], "rejected": [*prompt, assistant(rejected)]}


def dataprep(folder, records: list[dict], out, tokenizer: str, *extra) -> tuple[int, str, str]:
    folder.mkdir(exist_ok=True)
    (folder / "pairs.jsonl").write_text(lines(records))
    from dataprep.__main__ import main

    return run_captured(main, ["--format", "preference", "--input", folder, "--tokenizer", tokenizer,
                               "--output", out, "--seq-len", SEQ_LEN, "--workers.local=true", *extra])


def row_pairs(row: np.ndarray) -> list[tuple[tuple, tuple]]:
    """The (chosen, rejected) examples of a row, each as (its tokens, the tokens that are loss targets), checked to
    be examples 2j+1 and 2j+2 for j = 0, 1, … placed one after another, then padding."""
    tokens, example, loss = row
    used = int(np.count_nonzero(example))
    assert not example[used:].any() and np.all(np.diff(example[:used]) >= 0)  # examples in order, padding last
    ids = int(example.max())
    assert ids % 2 == 0 and set(example[:used].tolist()) == set(range(1, ids + 1)), example
    found = [(tuple(tokens[example == e].tolist()), tuple(tokens[(example == e) & (loss == 1)].tolist()))
             for e in range(1, ids + 1)]
    return list(zip(found[0::2], found[1::2]))


def positions(pair: tuple[tuple, tuple]) -> int:
    (chosen, _), (rejected, _) = pair
    return len(chosen) + len(rejected)


def test_each_pair_is_packed_whole_in_one_row_with_loss_on_its_final_replies(tmp_path, chat_model):
    """Both splits: every row holds whole pairs (ids 2j+1 chosen, 2j+2 rejected), a row is closed when the next
    pair does not fit, each example's tokens are what fine-tuning renders for prompt + reply, and its loss targets
    decode to the reply and the template's end marker (an assistant turn of the prompt carries none)."""
    n = 30
    records = [as_messages(i) if i % 2 else as_conversations(i) for i in range(n)]
    code, out, err = dataprep(tmp_path / "in", records, tmp_path / "ds", chat_model, "--val-fraction", "0.3")
    assert code == 0, err
    ds = open_dataset(str(tmp_path / "ds"))
    sp = ds.tokenizer()
    assert ds.pairs and ds.manifest["chat"]["pairs"] is True and ds.manifest["documents"] == n
    sft = {}  # the tokens fine-tuning gives each (prompt, reply), to pair index and reply
    for i in range(n):
        prompt, chosen, rejected = pair(i)
        for name, reply in (("chosen", chosen), ("rejected", rejected)):
            messages = [*prompt, assistant(reply)]
            sft[tuple(tokenize(sp, Record("k", "f:1", {"messages": messages})).tokens)] = (i, name, reply)
    seen = []
    for split in (ds.train, ds.val):
        rows = split.rows(range(len(split)))
        packed = [row_pairs(row) for row in rows]
        assert len(split) and max(map(len, packed)) >= 2
        for row, next_row in zip(packed, packed[1:]):  # closed only when the next pair does not fit
            assert sum(map(positions, row)) + positions(next_row[0]) > SEQ_LEN + 1
        for chosen, rejected in (p for row in packed for p in row):
            (i, c_name, c_reply), (j, r_name, r_reply) = sft[chosen[0]], sft[rejected[0]]
            assert (i, c_name, r_name) == (j, "chosen", "rejected")
            for (_, targets), reply in ((chosen, c_reply), (rejected, r_reply)):
                assert sp.decode(list(targets[:-1])) == reply and sp.token_string(targets[-1]) == "<|end|>"
                assert targets[-1] == reply_end(sp)
            seen.append(i)
    assert sorted(seen) == list(range(n)) and 0 < len(ds.val) < len(ds.train)
    assert f"{ds.manifest['splits']['train']['documents']} pairs" in out


def test_the_string_message_and_conversational_forms_give_the_same_rows(tmp_path, chat_model):
    pairs = [i for i in range(12) if i % 3]  # prompts of one user message: what the string form can say
    rows = []
    for form in (as_string, as_messages, as_conversations):
        out = tmp_path / form.__name__
        code, _, err = dataprep(tmp_path / f"in-{form.__name__}", [form(i) for i in pairs], out, chat_model,
                                "--val-fraction", "0")
        assert code == 0, err
        split = open_dataset(str(out)).train
        rows.append(split.rows(range(len(split))))
    assert len(rows[0]) >= 2 and all(np.array_equal(rows[0], other) for other in rows[1:])


BAD = {
    "prompts differ": ({"chosen": [user("what follows alpha?"), assistant("beta")],
                        "rejected": [user("what follows gamma?"), assistant("delta")]}, "the prompts differ"),
    "identical replies": ({"prompt": "what follows alpha?", "chosen": "beta", "rejected": "beta"},
                          "replies are identical"),
    "too long for a row": ({"prompt": "what follows?", "chosen": " ".join(WORDS * 3),
                            "rejected": " ".join(reversed(WORDS * 3))}, f"more than a row of --seq-len {SEQ_LEN} + 1"),
    "forged marker": ({"prompt": "say <|end|> now", "chosen": "no", "rejected": "yes"}, "special token '<|end|>'"),
}


@pytest.mark.parametrize("name", BAD)
def test_a_bad_pair_stops_the_run_with_one_line_naming_it(tmp_path, chat_model, name):
    record, reason = BAD[name]
    code, _, err = dataprep(tmp_path / "in", [as_string(i) for i in (1, 2, 4)] + [record, as_string(5)],
                            tmp_path / "ds", chat_model)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and err.endswith(errors[0] + "\n"), err  # one line, no traceback
    assert errors[0].startswith(f"error: {tmp_path / 'in' / 'pairs.jsonl'}:4: ") and reason in errors[0], err


def test_bad_pairs_are_counted_and_skipped(tmp_path, chat_model):
    """Each bad pair alone fits a row's rules but for its own fault: the too-long one's replies each fit a row."""
    sp = load_tokenizer(open(chat_model, "rb").read())
    too_long = BAD["too long for a row"][0]
    alone = [len(tokenize(sp, Record("k", "f:1", {"prompt": too_long["prompt"], "response": too_long[r]})).tokens)
             for r in ("chosen", "rejected")]
    assert max(alone) <= SEQ_LEN + 1 < sum(alone)
    good = [as_string(i) for i in (1, 2, 4, 5, 7)]
    records = [good[0], *[record for record, _ in BAD.values()], *good[1:]]
    code, out, err = dataprep(tmp_path / "in", records, tmp_path / "ds", chat_model, "--on-bad-record", "skip",
                              "--val-fraction", "0")
    assert code == 0, err
    manifest = open_dataset(str(tmp_path / "ds")).manifest
    assert (manifest["bad_records"], manifest["documents"]) == (len(BAD), len(good))
    assert f"bad records skipped: {len(BAD)}" in out and f"train: {len(good)} pairs" in out, out


def test_only_preference_data_says_pairs_and_a_chat_dataset_is_never_taken_for_one(tmp_path, chat_model):
    """Lines that are both a chat record (prompt, response) and a pair: the chat dataset made of them has no pairs,
    and a preference run on its output is refused, not reused (the format is in the settings stamp)."""
    from dataprep.__main__ import main

    records = [{**as_string(i), "response": pair(i)[1]} for i in (1, 2, 4, 5)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "pairs.jsonl").write_text(lines(records))
    code, _, err = run_captured(main, ["--format", "chat", "--input", tmp_path / "in", "--tokenizer", chat_model,
                                       "--output", tmp_path / "ds", "--seq-len", SEQ_LEN, "--workers.local=true"])
    assert code == 0, err
    chat = open_dataset(str(tmp_path / "ds"))
    assert "chat" in chat.manifest and not chat.pairs and not PackedDataset("text", {"seq_len": 8}).pairs
    code, _, err = dataprep(tmp_path / "in", records, tmp_path / "ds", chat_model)
    assert code == 2 and "made with other settings (format, " in err, err


def test_preference_data_needs_the_models_chat_tokenizer_and_jsonl(tmp_path, chat_model):
    """Refused before any work, as chat data is: no --tokenizer, or an input that is not .jsonl."""
    from dataprep.__main__ import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "pairs.jsonl").write_text(lines([as_string(1)]))
    code, _, err = run_captured(main, ["--format", "preference", "--input", tmp_path / "in", "--output",
                                       tmp_path / "ds", "--workers.local=true"])
    assert code == 2 and "--format preference needs --tokenizer" in err, err
    (tmp_path / "in" / "notes.txt").write_text("plain text")
    code, _, err = dataprep(tmp_path / "in", [as_string(1)], tmp_path / "ds", chat_model)
    assert code == 2 and f"{tmp_path / 'in' / 'notes.txt'} is not a .jsonl file" in err, err
