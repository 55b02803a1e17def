"""python -m trainer.generate --checkpoint RUN_DIR|STEP_DIR|WEIGHTS --prompt TEXT: continue a prompt with a KV cache (stops at EOS)."""

from __future__ import annotations

import argparse
import sys

import torch

from raylm.cli import HelpFormatter, run_cli
from raylm.errors import ConfigError, DataError
from raylm.paths import check_job_paths
from raylm.tokenizer import load_tokenizer, read_tokenizer_files
from trainer.model.generation import generate
from trainer.weights import load_weights


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.generate", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run or step-NNNNNN directory, a Hugging Face folder (both local or s3://) or raylm .pt weights")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tokenizer", help="SentencePiece .model, Hugging Face tokenizer.json or a folder holding one "
                                       "(default: the checkpoint's)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_job_paths(inputs={"--checkpoint": args.checkpoint, "--tokenizer": args.tokenizer}, outputs={})
    weights, tokenizer = load_with_tokenizer(args.checkpoint, args.tokenizer)
    prompt = tokenizer.encode([args.prompt])[0]
    if not 0 < len(prompt) <= weights.cfg.max_seq_len:
        raise ConfigError(f"--prompt is {len(prompt)} tokens; it must hold 1 to max_seq_len={weights.cfg.max_seq_len}")
    model = weights.model()
    generator = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(args.seed)
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   eos_id=tokenizer.eos_id, generator=generator)
    print(args.prompt + tokenizer.decode(out[len(prompt):]))
    return 0


def load_with_tokenizer(checkpoint: str, tokenizer: str | None):
    """(weights, tokenizer) of a checkpoint; `tokenizer` (a path) replaces the one it carries."""
    weights = load_weights(checkpoint)
    files = read_tokenizer_files(tokenizer) if tokenizer else weights.tokenizer
    if files is None:
        raise DataError(f"{checkpoint} carries no tokenizer; pass --tokenizer (a tokenizer.model, tokenizer.json "
                        "or the dataset's directory)")
    return weights, load_tokenizer(files, where=tokenizer or checkpoint)


if __name__ == "__main__":
    sys.exit(run_cli(main))
