"""The command-line runner every raylm tool shares: `--config FILE`, `--help`, `--section.field=value` overrides,
`--debug`/`--verbose`, and user mistakes printed as one `error:` line with exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import sys
from typing import Callable, Sequence

from raylm.config import config_help, load_config
from raylm.errors import ConfigError, find_user_error
from raylm.paths import check_config_paths
from raylm.ray_session import VERBOSE_ENV


COMMON_FLAGS = {"--verbose": "Ray's own lines too (start-up, worker prefixes, Tune's status)",
                "--debug": "full tracebacks for errors"}
"""Taken by run_cli on every raylm command."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help for a tool's argparse options: each option's default, unless it has none to show (None, a required
    option, a bare flag) or its help says what it is already (`(default: the checkpoint's)`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.required or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def parse_job_args(argv: list[str], *, prog: str, description: str, flags: dict[str, str] | None = None,
                   root: type, preset: dict[str, dict] | None = None, lists: dict[str, list[str]] | None = None):
    """(root config, set of plain flags given). Prints help and exits 0 on -h/--help. `preset`: see load_config;
    `lists`: {'section.field': values} of list options (expand_short_options), set over the rest; the root's
    MULTI_VALUE fields take several values the same way (`--data.path A B C`).

    The config's paths are checked for a Ray job's copy of its working directory (raylm.paths), but the fields
    the root's UNUSED_PATHS names (e.g. a study's `--run.dir`, which its trials replace)."""
    flags = flags or {}
    if "-h" in argv or "--help" in argv:
        print(" ".join(["usage:", prog, "[--config FILE]", *(f"[{f}]" for f in flags), "[--section.field=value ...]"]) + "\n")
        print(description + "\n")
        print("  --config FILE  TOML preset (see configs/); command-line values override it")
        for flag, text in {**flags, **COMMON_FLAGS}.items():
            print(f"  {flag}  {text}")
        print("\nFields (CLI > TOML > default):\n" + config_help(root))
        sys.exit(0)
    multi = getattr(root, "MULTI_VALUE", ())
    if multi:  # `--data.path A B C`: every value up to the next option
        argv, several = expand_short_options(argv, {f"--{name}": name for name in multi}, lists=multi, prog=prog,
                                             flags={**flags, **COMMON_FLAGS})
        lists = {**several, **(lists or {})}
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
    cfg = load_config(root, toml_path, rest, preset=preset)
    for key, values in (lists or {}).items():
        section, _, name = key.partition(".")
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **{name: values}))
    check_config_paths(cfg, skip=getattr(root, "UNUSED_PATHS", ()))
    return cfg, given


def expand_short_options(argv: list[str], short: dict[str, str], *, lists: tuple[str, ...] = (), prog: str,
                         flags: dict[str, str] | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """(argv with each short option `--flag VALUE` as `--section.field=VALUE`, the values of list options).

    A list option (`--input PATH [PATH ...]`) takes every value up to the next option; its values come back apart
    rather than comma-joined (a path may hold a comma). A short option given bare is `=true` (`--overwrite`). A
    `--word` that is neither a short option, one of the command's `flags` nor `--section.field` is refused, naming
    the nearest option."""
    out, given, i = [], {}, 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag not in short:
            if flag.startswith("--") and "." not in flag and flag not in ("--config", "--help", *(flags or {})):
                close = difflib.get_close_matches(flag, short, n=1, cutoff=0.8)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(f"unknown option {flag}{hint} (see {prog} --help)")
            out.append(argv[i])
        elif short[flag] in lists:
            values = [value] if eq else []
            while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                values.append(argv[i + 1])
                i += 1
            if not values:
                raise ConfigError(f"{flag} needs at least one value")
            given[short[flag]] = values
        elif eq:
            out.append(f"--{short[flag]}={value}")
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(f"--{short[flag]}={argv[i + 1]}")
            i += 1
        else:
            out.append(f"--{short[flag]}")  # bare: true for a bool field, a one-line error for any other
        i += 1
    return out, given


def short_help(short: dict[str, str]) -> str:
    width = max(map(len, short))
    return "\n".join(f"  {flag:{width}}  = --{field}" for flag, field in short.items())


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record, not at the time of setup."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def configure_logging(package: str) -> None:
    """INFO logs of one raylm package to stderr as `HH:MM:SS package.module: message`, once per process."""
    logger = logging.getLogger(package)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # every call: a level something else reset since (pytest's caplog does) is restored


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; a user mistake becomes one `error:` line on stderr and exit code 2.

    `--debug` anywhere in argv keeps the full traceback for user mistakes too; `--verbose` shows Ray's own lines
    (start-up, Ray Data's progress INFO, worker prefixes) that raylm otherwise folds away.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if "--verbose" in argv:
        os.environ[VERBOSE_ENV] = "1"
    else:
        logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        return int(main([a for a in argv if a not in ("--debug", "--verbose")]) or 0)
    except BrokenPipeError:  # stdout piped into a command that stopped reading (`--help | head`): as a shell does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit is quiet too
        return 141
    except Exception as exc:  # noqa: BLE001 - sorted into user mistakes and bugs below
        user_error = find_user_error(exc)
        if user_error is None or debug:
            raise
        print(f"error: {user_error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C; a CLI may say in its message how to continue
        print(f"interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr)
        return 130
