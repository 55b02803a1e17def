"""The prompts of an RL run: a .jsonl (local or s3://) of {"prompt": text or messages, "answer": ...}, anything else
passed through to the reward; rendered by the tokenizer's chat template with the assistant's turn opened, as
instruction tuning saw it. Step s takes prompts_per_step of them from a seeded permutation, epoch after epoch: a
function of (seed, step) alone, like every data order in raylm."""

from __future__ import annotations

import json
from dataclasses import dataclass

from raylm import storage
from raylm.chat_template import forged_marker, render_chat, reply_end
from raylm.errors import DataError
from raylm.tokenizer import Tokenizer

PROMPT_STREAM = 3
"""The seed stream of the prompts' order, a `trainer.data.EpochOrder` over the prompts (trainer/data.py's train and
val orders are 0 and 1, mixtures 2)."""


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    example: dict
    """The .jsonl line as read: the reward gets it whole."""


def messages_of(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str) and
                                                 isinstance(m.get("content"), str) for m in value):
        return value
    raise DataError(f"{where}: \"prompt\" must be a string or a list of {{\"role\", \"content\"}} messages, got "
                    f"{type(value).__name__}")


def read_prompts(path: str, tokenizer: Tokenizer, *, max_prompt_len: int) -> list[Prompt]:
    """Every prompt of `path`, rendered and tokenized; a bad line is refused in one line naming it."""
    if tokenizer.chat_template is None:
        raise DataError(f"{path}: the model's tokenizer has no chat template; start RL from an instruction-tuned "
                        "run or model (python -m dataprep --format chat, then python -m trainer)")
    try:
        lines = storage.read_bytes(path).decode().splitlines()
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"rl prompts {path} cannot be read ({exc}); pass a .jsonl of {{\"prompt\", \"answer\"}} "
                        "lines") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            example = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} is not JSON ({exc.msg}); each line is {{\"prompt\": ..., \"answer\": ...}}") \
                from None
        if not isinstance(example, dict) or "prompt" not in example:
            raise DataError(f"{where} has no \"prompt\"; each line is {{\"prompt\": ..., \"answer\": ...}}")
        messages = messages_of(example["prompt"], where)
        marker = forged_marker(tokenizer, messages)
        if marker:
            raise DataError(f"{where}: the prompt contains the special token {marker!r}, which would be read as "
                            "structure; remove it")
        ids = tokenizer.encode_rendered(render_chat(tokenizer, messages, add_generation_prompt=True))
        if len(ids) > max_prompt_len:
            raise DataError(f"{where}: the prompt is {len(ids)} tokens, more than the {max_prompt_len} the context "
                            "leaves beside rl.max_new_tokens; shorten it or lower rl.max_new_tokens")
        prompts.append(Prompt(tuple(ids), example))
    if not prompts:
        raise DataError(f"rl prompts {path} holds no prompt")
    return prompts


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The tokens a reply ends with: the template's end of a reply, and EOS."""
    return tuple(sorted({reply_end(tokenizer), tokenizer.eos_id}))
