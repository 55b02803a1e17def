"""python -m trainer.chat --checkpoint RUN_DIR: talk to a fine-tuned model in the terminal.

    python -m trainer.chat --checkpoint runs/sft [--system TEXT] [--temperature 0.7]

Each turn renders the whole conversation with the tokenizer's chat template (as fine-tuning saw it) and generates the
reply with a KV cache until the template's end-of-reply token. `/reset` starts a new conversation, `/quit` (or
Ctrl-D) leaves. The context is the model's max_seq_len: the oldest turns are dropped to make room.
"""

from __future__ import annotations

import argparse
import sys

import torch

from raylm.chat_template import forged_marker, render_chat, reply_end
from raylm.cli import run_cli
from raylm.errors import DataError
from raylm.tokenizer import Tokenizer
from trainer.generate import load_with_tokenizer
from trainer.model.generation import generate
from trainer.model.transformer import Transformer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run or step-NNNNNN directory (local or s3://), a Hugging "
                                                       "Face folder or raylm .pt weights")
    p.add_argument("--system", default="", help="a system message that starts every conversation")
    p.add_argument("--max_new_tokens", type=int, default=256, help="longest reply")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tokenizer", help="tokenizer to use instead of the checkpoint's")
    return p


def reply(model: Transformer, tokenizer: Tokenizer, messages: list[dict], *, max_new_tokens: int,
          temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None) -> str:
    """The assistant's next message after `messages`; the oldest turns after a system message are left out while
    the prompt and reply would not fit the context."""
    stop = reply_end(tokenizer)
    while True:
        prompt = tokenizer.encode_rendered(render_chat(tokenizer, messages, add_generation_prompt=True))
        droppable = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]
        if len(prompt) + max_new_tokens <= model.cfg.max_seq_len or len(droppable) < 2:
            break
        messages = [m for i, m in enumerate(messages) if i not in droppable[:2]]  # a user turn and its reply
    prompt = prompt[-(model.cfg.max_seq_len - 1):]
    out = generate(model, prompt, max_new_tokens, temperature, top_p=top_p, eos_id=stop, generator=generator)
    ids = out[len(prompt):]
    return tokenizer.decode(ids[:-1] if ids and ids[-1] in (stop, tokenizer.eos_id) else ids)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    weights, tokenizer = load_with_tokenizer(args.checkpoint, args.tokenizer)
    if tokenizer.chat_template is None:
        raise DataError(f"{args.checkpoint}'s tokenizer has no chat template; chat with a model fine-tuned on "
                        "chat data (python -m dataprep --format chat)")
    model = weights.model()
    generator = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(args.seed)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print("chat: /reset starts over, /quit leaves", flush=True)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if text == "/quit":
            return 0
        if text == "/reset":
            messages = list(start)
            print("(new conversation)")
            continue
        if not text:
            continue
        marker = forged_marker(tokenizer, [{"content": text}])
        if marker:
            print(f"(your message contains the special token {marker!r}, which would be read as structure; rephrase)")
            continue
        messages.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, generator=generator)
        messages.append({"role": "assistant", "content": answer})
        print(f"model> {answer}", flush=True)


if __name__ == "__main__":
    sys.exit(run_cli(main))
