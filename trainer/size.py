"""python -m trainer.size --config configs/X.toml [--model.field=value ...]: parameters and training FLOPs per token.

Reads only the [model] section, so it accepts full job presets; the model file itself stays free of config loading.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from raylm.cli import run_cli
from raylm.config import config_help, load_config
from trainer.model import ModelConfig


@dataclass(kw_only=True)
class SizeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)


def describe(m: ModelConfig, seq_len: int) -> str:
    """Parameter counts (total, without embeddings, active per token for MoE) and training FLOPs per token."""
    moe = f", {m.num_params(active=True) / 1e6:,.1f}M active per token (top-{m.top_k} of {m.n_experts} experts)"
    return (f"parameters: {m.num_params() / 1e6:,.1f}M total, {m.num_params(embeddings=False) / 1e6:,.1f}M without "
            f"embeddings{moe if m.n_experts else ''} (vocab {m.vocab_size:,})\n"
            f"training FLOPs/token at seq_len {seq_len}: {m.flops_per_token(seq_len) / 1e9:,.3f} GFLOP "
            f"(6·N_active + 12·L·H·head_dim·T)")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.size", description=__doc__, epilog=config_help(SizeConfig),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="TOML preset (its [model] section is read)")
    p.add_argument("--seq_len", type=int, help="sequence length of the FLOPs figure (default: model.max_seq_len)")
    args, overrides = p.parse_known_args(argv)
    model = load_config(SizeConfig, args.config, overrides, partial=True).model
    print(describe(model, args.seq_len or model.max_seq_len))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
