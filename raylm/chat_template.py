"""Chat templates: a tokenizer's Jinja template rendered as transformers renders it, and what the rendering says
about a conversation: which pieces are assistant replies (they carry loss), which token closes a reply (where
generation stops), and whether a message forges a special token. Data preparation masks replies with it; chat and
export stop generation with it.
"""

from __future__ import annotations

import datetime
import functools
import json

from raylm.tokenizer import Tokenizer

TEMPLATE_DATE = datetime.date(2024, 7, 26)
"""The date a template's `strftime_now` sees (Llama 3.x put today's date in the system turn): fixed, so a dataset's
bytes never depend on the day it was made. It is the date Llama 3.1's template falls back to."""


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from jinja2 import TemplateError

    def raise_exception(message):
        raise TemplateError(message)  # a conversation this template refuses: a bad record, not a failed run

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: TEMPLATE_DATE.strftime(fmt))
    return env.from_string(template)


def render_chat(tokenizer: Tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """The tokenizer's chat template applied to `messages`, with the variables transformers passes."""
    return _compiled(tokenizer.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                     bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token)


def forged_marker(tokenizer: Tokenizer, messages: list[dict]) -> str | None:
    """A special token's text found inside a message (it would be read as structure, not text), if any."""
    specials = tokenizer.special_strings()
    return next((s for m in messages for s in specials if s in m["content"]), None)


def segments(tokenizer: Tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, carries loss) pieces: each assistant turn is a piece of its own."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        with_reply = render_chat(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not with_reply.startswith(prompt):
            raise ValueError("the template does not render a conversation as its earlier turns plus the new one")
        pieces += [(prompt[len(done):], False), (with_reply[len(prompt):], True)]
        done = with_reply
    whole = render_chat(tokenizer, messages, add_generation_prompt=False)
    if not whole.startswith(done):
        raise ValueError("the template does not render a conversation as its earlier turns plus the new one")
    return pieces + [(whole[len(done):], False)]


def reply_end(tokenizer: Tokenizer) -> int:
    """The token the chat template closes an assistant reply with (where generation stops)."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
    prompt = render_chat(tokenizer, messages[:1], add_generation_prompt=True)
    reply = render_chat(tokenizer, messages, add_generation_prompt=False)[len(prompt):]
    after = reply[reply.index("Yes") + len("Yes"):]
    ids = tokenizer.encode_rendered(after) if after else []
    return ids[0] if ids else tokenizer.eos_id
