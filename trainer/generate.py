"""python -m trainer.generate --checkpoint RUN_DIR|STEP_DIR|WEIGHTS --prompt TEXT: continue a prompt with a KV cache (stops at EOS)."""

from __future__ import annotations

import argparse
import sys

import torch

from raylm.cli import run_cli
from raylm.errors import ConfigError, DataError
from dataprep.tokenizer import encode_exact, load_tokenizer
from trainer.model import generate
from trainer.weights import load_weights, read_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.generate", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run or step-NNNNNN directory (local or s3://), a Hugging Face folder or raylm .pt weights")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the checkpoint's)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    weights = load_weights(args.checkpoint)
    sp_bytes = read_tokenizer(args.tokenizer) if args.tokenizer else weights.tokenizer
    if sp_bytes is None:
        raise DataError(f"{args.checkpoint} carries no tokenizer; pass --tokenizer tokenizer.model")
    sp = load_tokenizer(sp_bytes, where=args.tokenizer or args.checkpoint)
    prompt = encode_exact(sp, [args.prompt])[0]
    if not 0 < len(prompt) <= weights.cfg.max_seq_len:
        raise ConfigError(f"--prompt is {len(prompt)} tokens; it must hold 1 to max_seq_len={weights.cfg.max_seq_len}")
    out = generate(weights.model(), prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   eos_id=sp.eos_id(), generator=torch.Generator().manual_seed(args.seed))
    print(args.prompt + sp.decode(out[len(prompt):]))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
