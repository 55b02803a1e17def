"""Which config fields are paths a command reads or writes, and the one check every command makes of them when it runs
as a Ray job in Ray's copy of its working directory.

`ray job submit --working-dir .` uploads the directory (less what `.rayignore` leaves out) and runs the command in a
copy Ray unpacks under `<Ray's temp dir>/session_…/runtime_resources/working_dir_files/_ray_pkg_<hash>/` on the node
that runs the job's driver, and deletes with the Ray session. A relative output path there is written into that copy
and vanishes with it (a run "finishes" and its checkpoints are gone); a relative input path there is found only if it
was uploaded. Resolving relative paths against the directory the job was submitted from instead would hold only when
the driver runs on the submitting machine, which a laptop submitting to a cluster's head is not, and nothing in the
job says where it was submitted from. So raylm refuses, in one line naming the option: a relative output path, and a
relative input path that is not among the uploaded files. Inputs that were uploaded (`--config configs/x.toml`, a
small example file) are read from the copy, as the user meant. Absolute paths and s3:// URLs are what a job takes.
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import os
import typing
from pathlib import PurePath
from typing import Annotated, Iterable


class Role(enum.Enum):
    INPUT = "input"
    OUTPUT = "output"


InPath = Annotated[str, Role.INPUT]
"""A config field that names a file or directory the command reads (local path or s3://)."""
OutPath = Annotated[str, Role.OUTPUT]
"""A config field that names a file or directory the command writes (local path or s3://)."""


def job_copy(cwd: str | None = None) -> str | None:
    """The root of the copy of a Ray job's working directory that `cwd` (default: this process's) lies in, or None.

    The working directory itself is the sign: whatever submitted the job (`ray job submit`, the Jobs SDK, a KubeRay
    RayJob), a command running there resolves relative paths into Ray's copy."""
    parts = PurePath(cwd or os.getcwd()).parts
    for i in range(1, len(parts) - 1):
        if parts[i - 1:i + 1] == ("runtime_resources", "working_dir_files"):
            return str(PurePath(*parts[:i + 2]))
    return None


def config_paths(cfg, *, skip: Iterable[str] = ()) -> dict[Role, dict[str, list[str]]]:
    """{Role: {'--section.field': its paths}} of every field of a root config marked InPath or OutPath (alone, in a
    list or `| None`), but those in `skip`."""
    found = {Role.INPUT: {}, Role.OUTPUT: {}}
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(part), include_extras=True)
        for f in dataclasses.fields(part):
            role, key = _role(hints[f.name]), f"--{section.name}.{f.name}"
            value = getattr(part, f.name)
            if role is not None and key not in skip and value:
                found[role][key] = value if isinstance(value, list) else [value]
    return found


def _role(tp) -> Role | None:
    """The Role an annotation carries: its own Annotated marker, or one inside `list[...]` or `... | None`."""
    if typing.get_origin(tp) is Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, Role)), None)
    return next(filter(None, map(_role, typing.get_args(tp))), None)


def check_job_paths(*, inputs: dict[str, str | list[str] | None], outputs: dict[str, str | None],
                    cwd: str | None = None) -> None:
    """Refuse, in one line naming the option and its value, what a Ray job's copy of its working directory would
    lose (see the module's docstring): a relative output path, or a relative input path missing from the copy.
    Anywhere else (`cwd`: default this process's working directory) this checks nothing."""
    from raylm.errors import ConfigError

    cwd = cwd or os.getcwd()
    copy = job_copy(cwd)
    if copy is None:
        return
    where = f"Ray's copy of this job's working directory ({copy}), which Ray deletes with its session"
    fix = "use an absolute path or an s3:// URL"
    written = _relative(outputs)
    if written:
        raise ConfigError(f"{written[0][0]} {written[0][1]} is a relative path: the command runs in {where}; {fix}")
    missing = [(flag, p) for flag, p in _relative(inputs) if not _uploaded(os.path.join(cwd, p))]
    if missing:
        raise ConfigError(f"{missing[0][0]} {missing[0][1]} is a relative path, and not among the files uploaded to "
                          f"{where} (`.rayignore` leaves data/, runs/ and other outputs out); {fix}")


def _uploaded(path: str) -> bool:
    """Whether a path, or a glob (dataprep's --input takes them), names something in the copy."""
    return os.path.exists(path) or bool(glob.glob(path, recursive=True))


def _relative(paths: dict[str, str | list[str] | None]) -> list[tuple[str, str]]:
    """(option, path) of each local path that is neither absolute nor ~/…."""
    from raylm.storage import is_s3

    return [(flag, p) for flag, value in paths.items() for p in ([value] if isinstance(value, str) else value or [])
            if p and not is_s3(p) and not os.path.isabs(os.path.expanduser(p))]


def option_paths(option: str, values: list[str]) -> dict[str, str]:
    """{option: path} of a list option, for checks that name the path at fault: `--x` for one value, `--x[i]` for
    the i-th of several."""
    return {option if len(values) == 1 else f"{option}[{i}]": v for i, v in enumerate(values)}


def check_config_paths(cfg, *, skip: Iterable[str] = ()) -> None:
    """check_job_paths of a root config's InPath and OutPath fields (but `skip`: fields the command ignores)."""
    found = config_paths(cfg, skip=skip)
    check_job_paths(inputs=found[Role.INPUT], outputs=found[Role.OUTPUT])
