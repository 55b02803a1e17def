"""python -m trainer.export: raylm weights → a Hugging Face folder (Llama or Mixtral), or back with --from-hf.

    python -m trainer.export --checkpoint WEIGHTS --out HF_DIR        # AutoModelForCausalLM/AutoTokenizer load it
    python -m trainer.export --from-hf HF_DIR --out WEIGHTS.pt         # continue pretraining a published model
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from dataprep.errors import ConfigError, run_cli
from trainer.hf import export
from trainer.weights import Weights, load_weights, save_weights


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="WEIGHTS", help="raylm weights (.pt) to export")
    src.add_argument("--from-hf", metavar="HF_DIR", help="a Hugging Face Llama/Mixtral folder to import")
    p.add_argument("--out", required=True, help="output: a Hugging Face folder (export) or a .pt file (import)")
    p.add_argument("--tokenizer", metavar="FILE", help="SentencePiece model to ship (default: the one in the weights)")
    return p


def export_weights(weights: Weights, out: str, tokenizer: str | None) -> None:
    if tokenizer is None and weights.tokenizer is not None:
        with tempfile.NamedTemporaryFile(suffix=".model", delete=False) as f:
            f.write(weights.tokenizer)
            tokenizer = f.name
    export(weights.state, weights.cfg, out, tokenizer_model=tokenizer)
    print(f"wrote Hugging Face folder {out} ({'Mixtral' if weights.cfg.n_experts else 'Llama'}, "
          f"{weights.cfg.num_params() / 1e6:.1f}M params{', tokenizer' if tokenizer else ', no tokenizer'})")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.checkpoint:
        export_weights(load_weights(args.checkpoint), args.out, args.tokenizer)
        return 0
    weights = load_weights(args.from_hf)
    if args.tokenizer:
        weights.tokenizer = open(args.tokenizer, "rb").read()
    if os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} is a directory; importing writes a .pt weights file")
    save_weights(args.out, weights)
    print(f"wrote raylm weights {args.out} ({weights.cfg.num_params() / 1e6:.1f}M params)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
