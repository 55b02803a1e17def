"""Preference records → pairs of chat examples (the prompt with the chosen reply, and with the rejected one).

A record is a .jsonl line `{"prompt": P, "chosen": C, "rejected": R}`: P a user message's text or a message list, C
and R a reply's text or an assistant message ({role: assistant, content}, alone or in a one-element list); or TRL's
conversational form `{"chosen": [messages], "rejected": [messages]}`, two conversations that share every message but
the final assistant reply. Each reply is rendered and masked by `dataprep.chat` exactly as fine-tuning renders a
conversation whose last turn it is, with loss on that reply alone (an assistant turn of the prompt is context).
Preference tuning compares the two replies' log-probs, so a pair is kept whole: its two examples share a row (a pair
that does not fit one is a bad record, never cut: a truncated reply would be compared on part of itself), and a pair
whose prompts differ or whose replies are identical is a bad record too.
"""

from __future__ import annotations

from dataclasses import dataclass

from dataprep.chat import Example, checked_messages, encode
from dataprep.sources import BadRecord, Record
from raylm.tokenizer import Tokenizer

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
        chosen, rejected = as_reply(value["chosen"], "chosen"), as_reply(value["rejected"], "rejected")
    else:  # TRL's conversational form: the prompt is what both conversations share
        chosen, rejected = value["chosen"], value["rejected"]
        if not (isinstance(chosen, list) and chosen and isinstance(rejected, list) and rejected):
            return "without 'prompt', 'chosen' and 'rejected' must be message lists (TRL's conversational form)"
        if chosen[:-1] != rejected[:-1]:
            return "the prompts differ: 'chosen' and 'rejected' must share every message but the final reply"
        prompt = chosen[:-1]
        chosen = as_reply(chosen[-1], "chosen's last message")
        rejected = as_reply(rejected[-1], "rejected's last message")
    wrong = next((r for r in (chosen, rejected) if isinstance(r, str)), None)
    if wrong:
        return wrong
    if chosen["content"] == rejected["content"]:
        return "the chosen and rejected replies are identical: there is nothing to prefer"
    return prompt, chosen, rejected


def as_reply(value: object, name: str) -> dict | str:
    """A reply given as text or as an assistant message (alone or in a one-element list), or what is wrong."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict) and value.get("role") == "assistant" and isinstance(value.get("content"), str):
        return {"role": "assistant", "content": value["content"]}
    return f"{name} is not a reply (text, or an assistant message {{role: assistant, content: text}})"
