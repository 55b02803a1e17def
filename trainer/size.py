"""python -m trainer.size --config configs/X.toml: parameter counts and training FLOPs per token of a preset."""

from __future__ import annotations

import sys

from dataprep.errors import run_cli
from trainer.cli import parse_job_args


def main(argv: list[str]) -> int:
    job, _ = parse_job_args(argv, prog="python -m trainer.size", description=__doc__)
    m, seq = job.model, job.model.max_seq_len
    print(f"parameters: {m.num_params() / 1e6:,.1f}M total, {m.num_params(embeddings=False) / 1e6:,.1f}M without "
          f"embeddings" + (f", {m.num_params(active=True) / 1e6:,.1f}M active per token (top-{m.top_k} of "
                           f"{m.n_experts} experts)" if m.n_experts else ""))
    print(f"training FLOPs/token at seq_len {seq}: {m.flops_per_token(seq) / 1e9:,.3f} GFLOP "
          f"(6·N_active + 12·L·H·head_dim·T)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
