"""The one exception family for user mistakes, and the CLI wrapper that prints them as one line.

Every raylm entry point (`python -m dataprep`, `python -m trainer`, `python -m tune`) runs its main through
`run_cli`, so a bad path, field or value ends as `error: <message>` and exit code 2, while a programming error
keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

from raylm.ray_session import VERBOSE_ENV


class RaylmError(Exception):
    """A user mistake: the message says what is wrong, where (file, field, value) and what to do."""


class ConfigError(RaylmError):
    """A bad option, config field or value."""


class DataError(RaylmError):
    """A bad, missing or unreadable input or dataset."""


class StorageError(RaylmError):
    """Object storage unreachable, misconfigured or not writable."""


def find_user_error(exc: BaseException | None) -> RaylmError | None:
    """The RaylmError behind `exc`, looking through Ray's task/actor wrappers and exception chains."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RaylmError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


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
        logger.setLevel(logging.INFO)


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
    except Exception as exc:  # noqa: BLE001 - sorted into user mistakes and bugs below
        user_error = find_user_error(exc)
        if user_error is None or debug:
            raise
        print(f"error: {user_error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C; a CLI may say in its message how to continue
        print(f"interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr)
        return 130
