"""Chat records → token ids with a loss mask, through the tokenizer's own chat template.

A record is a .jsonl line with `messages: [{role, content}, ...]` (roles system, user, assistant) or a
`prompt`/`response` pair (a user message and the assistant's reply). Only assistant turns carry loss: the template is
rendered up to each assistant turn with the generation prompt, and again with the turn, and the difference is that
turn (its text and the end marker the template closes it with, so the model learns to stop). The conversation is
tokenized segment by segment, and checked to give the same ids as tokenizing the whole rendered conversation: a
template whose pieces tokenize differently is refused, never silently mis-masked. When the dataset's documents start
with BOS (`--bos`), a conversation whose template does not render BOS itself gets one before it (carrying no loss).
Preference pairs (dataprep/preference.py) render each of their replies with the same `encode`.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError

from dataprep.sources import BadRecord, Record
from raylm.chat_template import forged_marker, segments
from raylm.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    key: str
    tokens: list[int]
    loss: list[bool]
    """Whether each token is a target that carries loss (an assistant turn's)."""


def conversation(record: Record) -> list[dict] | BadRecord:
    """The record's messages, checked (`checked_messages`)."""
    value = record.value
    if isinstance(value, dict) and "messages" not in value and {"prompt", "response"} <= value.keys():
        value = {"messages": [{"role": "user", "content": value["prompt"]},
                              {"role": "assistant", "content": value["response"]}]}
    messages = value.get("messages") if isinstance(value, dict) else None
    if not isinstance(messages, list) or not messages:
        return BadRecord(record.where, "no 'messages' list (or 'prompt' and 'response'); fix the line or pass "
                                       "--on-bad-record skip")
    return checked_messages(messages, record.where)


def checked_messages(messages: list, where: str) -> list[dict] | BadRecord:
    """`messages` as {role, content} dicts, checked: known roles, text content, a user turn before the first reply,
    a reply."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return BadRecord(where, f"message {i} is not {{role: {'/'.join(ROLES)}, content: text}}; fix the "
                                    "line or pass --on-bad-record skip")
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if not roles or roles[0] != "user" or "assistant" not in roles:
        return BadRecord(where, "a conversation needs a user message first and an assistant reply; fix the "
                                "line or pass --on-bad-record skip")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize(tokenizer: Tokenizer, record: Record) -> Example | BadRecord:
    """The record as token ids and loss flags, or why it cannot be used."""
    messages = conversation(record)
    if isinstance(messages, BadRecord):
        return messages
    return encode(tokenizer, messages, key=record.key, where=record.where)


def encode(tokenizer: Tokenizer, messages: list[dict], *, key: str, where: str,
           final_reply_only: bool = False) -> Example | BadRecord:
    """Checked messages as token ids and loss flags (every assistant turn carries loss, or with `final_reply_only`
    the last one alone: earlier replies are then context), or why the template cannot render and mask them."""
    marker = forged_marker(tokenizer, messages)
    if marker:
        return BadRecord(where, f"a message contains the special token {marker!r}; remove it or pass "
                                "--on-bad-record skip")
    try:
        parts = segments(tokenizer, messages)
    except (TemplateError, ValueError) as exc:
        return BadRecord(where, f"the chat template ({tokenizer.chat_template_name}) cannot render this "
                                f"conversation: {str(exc).splitlines()[0]}")
    if final_reply_only:
        last = max(i for i, (_, carries) in enumerate(parts) if carries)
        parts = [(text, carries and i == last) for i, (text, carries) in enumerate(parts)]
    tokens, loss = [], []
    for text, carries in parts:
        ids = tokenizer.encode_rendered(text) if text else []
        tokens += ids
        loss += [carries] * len(ids)
    if tokens != tokenizer.encode_rendered("".join(text for text, _ in parts)):
        return BadRecord(where, f"the chat template ({tokenizer.chat_template_name}) tokenizes differently "
                                "in pieces than whole, so the assistant turns cannot be masked exactly; use a "
                                "template whose turns end in a special token")
    if tokenizer.bos_first and tokens[:1] != [tokenizer.bos_id]:  # a template that renders BOS keeps just its own
        tokens, loss = [tokenizer.bos_id] + tokens, [False] + loss
    return Example(key, tokens, loss)
