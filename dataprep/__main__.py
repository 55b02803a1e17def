"""python -m dataprep: corpus (local or s3://) → tokenizer + packed Arrow shards + manifest (local or s3://)."""

from __future__ import annotations

import argparse
import difflib
import sys

from raylm.cli import configure_logging, run_cli
from raylm.errors import ConfigError
from dataprep.pipeline import DEMO_EXCLUDE, DataprepConfig, demo_inputs, run

DEMO_OUTPUT = "data/stdlib"
DEFAULTS = {"vocab_size": 32000, "seq_len": 2048}
DEMO_DEFAULTS = {"vocab_size": 8000, "seq_len": 256}
"""The demo corpus gets CPU-sized defaults, so `python -m trainer --config configs/demo.toml` trains in minutes."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one worth reading."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors become raylm's one-line error, exit 2
        raise ConfigError(f"{message}{self.did_you_mean(message)} (see python -m dataprep --help)")

    def did_you_mean(self, message: str) -> str:
        """'; did you mean --x?' for the first unrecognized option that is close to a real one."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        options = [o for action in self._actions for o in action.option_strings]
        for arg in message.split(":", 1)[1].split():
            if close := difflib.get_close_matches(arg.split("=")[0], options, n=1, cutoff=0.8):
                return f"; did you mean {close[0]}?"
        return ""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m dataprep",
        description="Tokenize a text corpus with SentencePiece on Ray Data and pack it into fixed-length Arrow "
        "shards for `python -m trainer`. With no --input, the demo corpus is this Python's standard library "
        f"(*.py, invalid UTF-8 replaced), written to {DEMO_OUTPUT} with --vocab-size {DEMO_DEFAULTS['vocab_size']} "
        f"--seq-len {DEMO_DEFAULTS['seq_len']} unless given.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--input", nargs="+", metavar="PATH", help="files, directories (recursive), globs or s3:// "
                   "prefixes; .txt/.md/.py/… (one file = one document), .jsonl, .parquet, optionally .gz/.zst")
    p.add_argument("--output", metavar="DIR", help=f"dataset directory, local or s3:// (demo: {DEMO_OUTPUT})")
    p.add_argument("--tokenizer", metavar="FILE", help="an existing SentencePiece .model to use instead of training one")
    p.add_argument("--vocab-size", type=int, metavar="N", help="vocabulary of the trained BPE tokenizer (byte fallback; "
                   f"default {DEFAULTS['vocab_size']})")
    p.add_argument("--tokenizer-sample-mb", type=float, metavar="MB", default=64.0, help="text sampled (seeded) to train the tokenizer")
    p.add_argument("--seq-len", type=int, metavar="N", help="tokens per training sequence; rows hold seq_len + 1 "
                   f"(default {DEFAULTS['seq_len']})")
    p.add_argument("--val-fraction", type=float, metavar="F", default=0.005, help="share of documents sent to val/ (by hash of their path/line)")
    p.add_argument("--text-field", metavar="NAME", default="text", help="field (.jsonl) or column (.parquet) holding the text")
    p.add_argument("--shard-size", dest="shard_size_mb", type=float, metavar="MB", default=128.0, help="target shard size in MB")
    p.add_argument("--num-workers", type=int, metavar="N", help="tokenizer actors, one CPU each, started as the cluster has CPUs for them (default: one per CPU present)")
    p.add_argument("--seed", type=int, metavar="N", default=0, help="seeds the tokenizer sample and the train/val split")
    p.add_argument("--on-bad-record", choices=["error", "skip"], default="error",
                   help="a bad file/line (not JSON, missing field, corrupt, binary): stop with its name, or skip and count")
    p.add_argument("--encoding-errors", choices=["strict", "replace"], default="strict",
                   help="invalid UTF-8: stop with the file and byte offset, or replace the bytes and count the document")
    p.add_argument("--max-files", type=int, metavar="N", help="use only the first N files in path order (quick runs)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished dataset made with other settings")
    p.add_argument("--debug", action="store_true", help="full tracebacks for errors")
    p.add_argument("--verbose", action="store_true", help="Ray's own lines too (start-up, Ray Data's INFO, worker prefixes)")
    return p


def main(argv: list[str]) -> int:
    args = vars(build_parser().parse_args(argv))
    args.pop("debug"), args.pop("verbose")  # handled by run_cli
    demo = not args["input"]
    if demo:
        args["input"] = demo_inputs()
        args["output"] = args["output"] or DEMO_OUTPUT
        args["encoding_errors"] = "replace"
    elif not args["output"]:
        raise ConfigError("--output DIR is required with --input (a local directory or s3:// prefix)")
    for name, default in (DEMO_DEFAULTS if demo else DEFAULTS).items():
        args[name] = default if args[name] is None else args[name]
    configure_logging("dataprep")
    cfg = DataprepConfig(inputs=args.pop("input"), **args)
    run(cfg, exclude=DEMO_EXCLUDE if demo else None)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
