"""python -m trainer.export: raylm weights → a Hugging Face folder (Llama or Mixtral), or back with --from-hf.

    python -m trainer.export --checkpoint RUN_DIR --out HF_DIR        # AutoModelForCausalLM/AutoTokenizer load it
    python -m trainer.export --from-hf HF_DIR --out WEIGHTS.pt         # continue pretraining a published model
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from raylm.cli import run_cli
from raylm.errors import ConfigError
from raylm.paths import check_job_paths
from raylm.tokenizer import read_tokenizer_files
from trainer.hf import export
from trainer.weights import load_weights, save_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="a run or step-NNNNNN directory, raylm .pt weights or a Hugging Face folder to export")
    src.add_argument("--from-hf", metavar="HF_DIR", help="a Hugging Face Llama/Mixtral folder to import")
    p.add_argument("--out", required=True, help="output: a Hugging Face folder (export) or a .pt file (import)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer to ship: a SentencePiece .model, a Hugging Face "
                   "tokenizer.json or a folder holding one (default: the one in the weights)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the exported tensors (default float32)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_job_paths(inputs={"--checkpoint": args.checkpoint, "--from-hf": args.from_hf, "--tokenizer": args.tokenizer},
                    outputs={"--out": args.out})
    weights = load_weights(args.checkpoint or args.from_hf)
    if args.tokenizer:
        weights.tokenizer = read_tokenizer_files(args.tokenizer)
    if args.checkpoint:
        export(weights.state, weights.cfg, args.out, tokenizer=weights.tokenizer, dtype=DTYPES[args.dtype])
        kind = "Mixtral" if weights.cfg.n_experts else "Llama"
        print(f"wrote Hugging Face folder {args.out} ({kind}, {weights.cfg.num_params() / 1e6:.1f}M params, "
              f"{args.dtype}, {'with' if weights.tokenizer else 'no'} tokenizer)")
        return 0
    if os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} is a directory; importing writes a .pt weights file")
    save_weights(args.out, weights)
    print(f"wrote raylm weights {args.out} ({weights.cfg.num_params() / 1e6:.1f}M params)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
