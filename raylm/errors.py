"""The one exception family for user mistakes, and how to find one behind Ray's wrappers.

Every raylm command prints a RaylmError as one `error: <message>` line and exits 2 (`raylm.cli.run_cli`); any other
exception is a programming error and keeps its traceback.
"""

from __future__ import annotations

class RaylmError(Exception):
    """A user mistake: the message says what is wrong, where (file, field, value) and what to do."""


class ConfigError(RaylmError):
    """A bad option, config field or value."""


class DataError(RaylmError):
    """A bad, missing or unreadable input or dataset."""


class StorageError(RaylmError):
    """Object storage unreachable, misconfigured or not writable."""


def find_user_error(exc: BaseException | None) -> RaylmError | None:
    """The RaylmError behind `exc`, looking through Ray's task/actor wrappers and exception chains.

    A Ray task that raised a DataError comes back as a `RayTaskError(DataError)`, itself a DataError whose message
    is Ray's traceback: the one to print is its `cause`."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(exc, RaylmError) and not isinstance(cause, BaseException):
            return exc
        exc = cause or exc.__cause__ or exc.__context__
    return None
