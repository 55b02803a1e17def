"""python -m dataprep: a text corpus (local or s3://) → tokenizer + packed Arrow shards + manifest (local or s3://).

    python -m dataprep [--config dataprep.toml] --input PATH [PATH ...] --output DIR [--section.field=value ...]

Ray Data runs one task per work unit (consecutive input files up to pack.unit_mb): it reads, tokenizes, packs and
writes its own shards; the manifest is written last. Killed and run again with the same command, it keeps the
finished units. `--workers.local=true` trains the tokenizer and runs the units in this process instead, one after
another, without Ray (a machine with no Ray installed): the same bytes. With no input, the demo corpus is this
Python's standard library (*.py, invalid UTF-8 replaced), written to data/stdlib with CPU-sized defaults (vocab
8000, seq_len 256, 2 MB units) unless given.

    python -m dataprep --format chat --input CHATS.jsonl --tokenizer MODEL_OR_RUN --output DIR   # for fine-tuning

turns conversations into packed rows with a loss mask on the assistant turns, through the tokenizer's chat template;

    python -m dataprep --format preference --input PAIRS.jsonl --tokenizer MODEL_OR_RUN --output DIR   # for DPO

turns preference pairs (prompt, chosen, rejected) into two such examples each, both in one row.
"""

from __future__ import annotations

import dataclasses
import sys

from dataprep.config import ALIASES, DataprepConfig
from raylm.cli import configure_logging, expand_short_options, parse_job_args, run_cli, short_help
from raylm.errors import ConfigError

DEMO_PRESET = {
    "input": {"encoding_errors": "replace"},
    "tokenizer": {"vocab_size": 8000},
    "pack": {"seq_len": 256, "unit_mb": 2.0},
    "output": {"dir": "data/stdlib"},
}
"""The demo's own defaults: a dataset `python -m trainer --config configs/demo.toml` trains on in minutes."""


def parse_args(argv: list[str]) -> tuple[DataprepConfig, bool]:
    """(config, whether it is the demo). The demo preset sits under the TOML file and the command line."""
    argv, lists = expand_short_options(argv, ALIASES, lists=("input.paths",), prog="python -m dataprep")
    description = f"{__doc__}\nShort options (the first version's flags):\n{short_help(ALIASES)}"
    cfg, _ = parse_job_args(argv, prog="python -m dataprep", description=description, root=DataprepConfig,
                            lists=lists)
    demo = not cfg.input.paths
    if demo:
        from dataprep.pipeline import demo_inputs

        cfg, _ = parse_job_args(argv, prog="python -m dataprep", description=description, root=DataprepConfig,
                                preset=DEMO_PRESET)
        cfg.input = dataclasses.replace(cfg.input, paths=demo_inputs())
    if not cfg.output.dir:
        raise ConfigError("--output DIR (output.dir) is required with --input: a local directory or s3:// prefix")
    return cfg, demo


def main(argv: list[str]) -> int:
    cfg, demo = parse_args(argv)
    configure_logging("dataprep")
    from dataprep.pipeline import run

    run(cfg, demo=demo)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
