"""Chat records → token ids with a loss mask, through the tokenizer's own chat template; preference records → pairs
of them.

A record is a .jsonl line with `messages: [{role, content}, ...]` (roles system, user, assistant) or a
`prompt`/`response` pair (a user message and the assistant's reply). Only assistant turns carry loss: the template is
rendered up to each assistant turn with the generation prompt, and again with the turn, and the difference is that
turn (its text and the end marker the template closes it with, so the model learns to stop). The conversation is
tokenized segment by segment, and checked to give the same ids as tokenizing the whole rendered conversation: a
template whose pieces tokenize differently is refused, never silently mis-masked. When the dataset's documents start
with BOS (`--bos`), a conversation whose template does not render BOS itself gets one before it (carrying no loss).

A preference record (`--format preference`) is `{"prompt": P, "chosen": C, "rejected": R}`: P a user message's text
or a message list, C and R a reply's text or an assistant message ({role: assistant, content}, alone or in a
one-element list); or TRL's conversational form `{"chosen": [messages], "rejected": [messages]}`, two conversations
that share every message but the final assistant reply. Each reply becomes an example exactly as a conversation
whose last turn it is, with loss on that reply alone (an assistant turn of the prompt is context). Preference tuning
compares the two replies' log-probs, so a pair is kept whole: its two examples share a row (a pair that does not fit
one is a bad record, never cut: a truncated reply would be compared on part of itself), and a pair whose prompts
differ or whose replies are identical is a bad record too.
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


SKIP = "fix the line or pass --on-bad-record skip"
"""The end of a bad pair's line: what to do."""


@dataclass(frozen=True)
class Pair:
    key: str
    """The record's key: both examples go to the split it hashes to."""
    chosen: Example
    rejected: Example


def tokenize_pair(tokenizer: Tokenizer, record: Record, *, positions: int) -> Pair | BadRecord:
    """The record's two examples, each with loss on its final reply only, or why it cannot be used; together they
    must fit a row of `positions` tokens."""
    found = prompt_and_replies(record.value)
    if isinstance(found, str):
        return BadRecord(record.where, f"{found}; {SKIP}")
    prompt, *replies = found
    examples = []
    for reply in replies:
        messages = checked_messages([*prompt, reply], record.where)
        example = messages if isinstance(messages, BadRecord) else \
            encode(tokenizer, messages, key=record.key, where=record.where, final_reply_only=True)
        if isinstance(example, BadRecord):
            return example
        examples.append(example)
    chosen, rejected = examples
    if len(chosen.tokens) + len(rejected.tokens) > positions:
        return BadRecord(record.where, f"the pair takes {len(chosen.tokens)} + {len(rejected.tokens)} tokens (chosen + "
                                       f"rejected), more than a row of --seq-len {positions - 1} + 1 holds; shorten "
                                       f"the replies, raise --seq-len or {SKIP}")
    return Pair(record.key, chosen, rejected)


def prompt_and_replies(value: object) -> tuple[list, dict, dict] | str:
    """(prompt messages, chosen reply, rejected reply) of a record, or what is wrong with it."""
    if not isinstance(value, dict) or not {"chosen", "rejected"} <= value.keys():
        return "no 'chosen' and 'rejected' replies"
    if "prompt" in value:
        prompt = value["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list):
            return "'prompt' is neither text nor a message list"
        chosen, rejected = reply(value["chosen"], "chosen"), reply(value["rejected"], "rejected")
    else:  # TRL's conversational form: the prompt is what both conversations share
        chosen, rejected = value["chosen"], value["rejected"]
        if not (isinstance(chosen, list) and chosen and isinstance(rejected, list) and rejected):
            return "without 'prompt', 'chosen' and 'rejected' must be message lists (TRL's conversational form)"
        if chosen[:-1] != rejected[:-1]:
            return "the prompts differ: 'chosen' and 'rejected' must share every message but the final reply"
        prompt = chosen[:-1]
        chosen, rejected = reply(chosen[-1], "chosen's last message"), reply(rejected[-1], "rejected's last message")
    wrong = next((r for r in (chosen, rejected) if isinstance(r, str)), None)
    if wrong:
        return wrong
    if chosen["content"] == rejected["content"]:
        return "the chosen and rejected replies are identical: there is nothing to prefer"
    return prompt, chosen, rejected


def reply(value: object, name: str) -> dict | str:
    """A reply given as text or as an assistant message (alone or in a one-element list), or what is wrong."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict) and value.get("role") == "assistant" and isinstance(value.get("content"), str):
        return {"role": "assistant", "content": value["content"]}
    return f"{name} is not a reply (text, or an assistant message {{role: assistant, content: text}})"
