"""python -m trainer.size --config configs/X.toml [--data.path DATASET] [--section.field=value ...]: the parameters and
training FLOPs per token of the model `python -m trainer` would build with the same arguments.

It takes every field the trainer takes, and like the trainer it takes the vocabulary (or, with init.from_hf, the
architecture) and the sequence length from the dataset (`trainer.train.resolve_model`). Without a dataset at
data.path it says which vocabulary and sequence length it assumed (model.vocab_size, model.max_seq_len).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from raylm import storage
from raylm.cli import parse_job_args, run_cli
from trainer.job import DataConfig, JobConfig, make_paths_absolute
from trainer.model.config import ModelConfig

FLAGS = {"--seq_len N": "sequence length of the FLOPs figure (default: the dataset's, else model.max_seq_len)"}


@dataclass(kw_only=True)
class SizeConfig:
    """A preset's [model] section alone (other sections skipped): for tests and benchmarks that build its model."""
    model: ModelConfig = field(default_factory=ModelConfig)


def describe(m: ModelConfig, seq_len: int) -> str:
    """Parameter counts (total, without embeddings, active per token for MoE) and training FLOPs per token."""
    moe = f", {m.num_params(active=True) / 1e6:,.1f}M active per token (top-{m.top_k} of {m.n_experts} experts)"
    return (f"parameters: {m.num_params() / 1e6:,.1f}M total ({m.num_params():,}), "
            f"{m.num_params(embeddings=False) / 1e6:,.1f}M without embeddings{moe if m.n_experts else ''} "
            f"(vocab {m.vocab_size:,})\n"
            f"training FLOPs/token at seq_len {seq_len}: {m.flops_per_token(seq_len) / 1e9:,.3f} GFLOP "
            f"(6·N_active + 12·L·H·head_dim·T)")


def resolve(job: JobConfig) -> tuple[int, str]:
    """(sequence length the trainer would train at, where it and the vocabulary come from), with `job.model` made
    what the trainer builds. The default data.path may hold no dataset (sizes of a preset before any dataprep);
    a data.path given that holds none is the trainer's error."""
    from raylm.dataset import MANIFEST, open_datasets
    from trainer.train import resolve_model

    default = [storage.absolute(path) for path in DataConfig().path]
    if job.data.path == default and not storage.exists(storage.join(default[0], MANIFEST)):
        return job.model.max_seq_len, (f"assumed: vocab {job.model.vocab_size:,} (model.vocab_size) and seq "
                                       f"{job.model.max_seq_len:,} (model.max_seq_len), as no dataset is at "
                                       f"{default[0]}; pass --data.path for the trainer's figures")
    dataset = open_datasets(job.data.path)
    resolve_model(job, dataset)
    return dataset.seq_len, (f"vocab {dataset.vocab_size:,} and seq {dataset.seq_len:,} from the dataset "
                             f"{dataset.directory}, as the trainer takes them")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--seq_len", type=int)
    args, rest = p.parse_known_args(argv)
    job, _ = parse_job_args(rest, prog="python -m trainer.size", description=__doc__, flags=FLAGS, root=JobConfig)
    make_paths_absolute(job)
    seq_len, source = resolve(job)
    print(describe(job.model, args.seq_len or seq_len))
    print(source)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
