"""Shared command-line handling: `--config FILE`, `--help`, plain flags, and `--section.field=value` overrides."""

from __future__ import annotations

import sys

from dataprep.errors import ConfigError
from trainer.config import config_help, load_config
from trainer.job import JobConfig


COMMON_FLAGS = {"--verbose": "Ray's own lines too (start-up, worker prefixes, Tune's status)",
                "--debug": "full tracebacks for errors"}
"""Taken by run_cli on every raylm command."""


def parse_job_args(argv: list[str], *, prog: str, description: str, flags: dict[str, str] | None = None,
                   root: type = JobConfig):
    """(root config, set of plain flags given). Prints help and exits 0 on -h/--help."""
    flags = flags or {}
    if "-h" in argv or "--help" in argv:
        print(f"usage: {prog} [--config FILE] {' '.join(f'[{f}]' for f in flags)} [--section.field=value ...]\n")
        print(description + "\n")
        print("  --config FILE  TOML preset (see configs/); command-line values override it")
        for flag, text in {**flags, **COMMON_FLAGS}.items():
            print(f"  {flag}  {text}")
        print("\nFields (CLI > TOML > default):\n" + config_help(root))
        sys.exit(0)
    toml_path, given, rest, i = None, set(), [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                toml_path = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                toml_path, i = argv[i + 1], i + 1
            else:
                raise ConfigError("--config needs a TOML file")
        elif arg in flags:
            given.add(arg)
        else:
            rest.append(arg)
        i += 1
    return load_config(root, toml_path, rest), given
