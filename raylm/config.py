"""Config loading: dataclass defaults < TOML file < `--section.field=value` on the command line.

A root config is a dataclass whose fields are section dataclasses (`JobConfig(model=ModelConfig, optim=…)`); a TOML
file has one table per section. Every mistake (unknown section or field, a value of the wrong type, a failed check in
a section's `__post_init__`) is a one-line `ConfigError` naming the field, the value and the file or option.
Values are coerced from the field's annotation: int, float, str, bool (true/false/1/0/yes/no/on/off), `X | None`
(`none` on the command line; TOML has no null, so None fields are left out of written files), and lists/tuples of
those (comma-separated on the command line, arrays in TOML).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import sys
import textwrap
import types
import typing
from functools import lru_cache
from typing import Any, TypeVar

from raylm.errors import ConfigError, StorageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def sections(root_cls) -> dict[str, type]:
    """Section name → section dataclass of a root config."""
    return field_types(root_cls)


def field_types(cls) -> dict[str, Any]:
    """Field name → resolved annotation of a dataclass (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` (from TOML or a command-line string) as type `tp`, or a ConfigError naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # the first member that takes the value
        members = [a for a in args if a is not type(None)]
        if len(members) < len(args) and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        for member in members[:-1]:
            try:
                return coerce(value, member, where)
            except ConfigError:
                pass
        return coerce(value, members[-1], where)
    if origin is dict:  # a TOML table, or NAME=VALUE,NAME=VALUE on the command line
        if isinstance(value, str):
            pairs = [part.partition("=") for part in value.split(",") if part.strip()]
            if any(not sep for _, sep, _ in pairs):
                raise ConfigError(f"{where}={value!r} is not NAME=VALUE,NAME=VALUE,...")
            value = {name.strip(): item.strip() for name, _, item in pairs}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} is not a table of NAME = VALUE")
        return {coerce(k, args[0], where): coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{where}={value!r} is not a list")
        items = [coerce(v.strip() if isinstance(v, str) else v, args[0], where) for v in items if v != ""]
        return items if origin is list else tuple(items)
    return _scalar(value, tp, where)


def _scalar(value: Any, tp: type, where: str) -> Any:
    """A string (command line, or quoted in TOML) is parsed; any other TOML value must have the field's type
    (an int is also a float)."""
    if isinstance(value, str) and tp is not str:
        text = value.strip()
        if tp is bool and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        if tp is not bool:
            try:
                return tp(text)
            except ValueError:
                pass
    elif type(value) is tp:  # `type(...) is`: a TOML `true` must not pass as an int
        return value
    elif tp is float and type(value) is int:
        return float(value)  # TOML `rope_theta = 500000`
    raise ConfigError(f"{where}={value!r} is not a valid {_type_name(tp)}")


FLAG = "\0flag"
"""The value of a bare `--section.field`: true for a bool field, an error for any other."""


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`--section.field=value` / `--section.field value` / bare `--section.field` → {'section.field': value}."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.field=value (see --help)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                value = FLAG
            else:
                value, i = args[i + 1], i + 1
        out[key] = value
        i += 1
    return out


def _read_toml(path: str) -> dict:
    """A TOML file, local or s3:// (a study on S3 writes its best.toml there)."""
    from raylm import storage

    try:
        return tomllib.loads(storage.read_bytes(path).decode())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise StorageError(storage.describe_os_error(exc, path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc})") from None


def load_config(root_cls: type[T], toml_path: str | None = None, overrides: list[str] | None = None, *,
                partial: bool = False, preset: dict[str, dict] | None = None) -> T:
    """Build `root_cls` from its defaults, then `preset` (a tool's own defaults for a mode, e.g. dataprep's demo),
    then the TOML file, then command-line overrides.

    `partial=True` lets a tool whose root holds only some sections read a full preset: TOML sections the root does not
    define are skipped (e.g. `python -m trainer.size` reads only `[model]`); otherwise they are an error, so a typo'd
    `[optm]` never goes unnoticed. Overrides of unknown sections or fields are always an error.
    """
    toml = _read_toml(toml_path) if toml_path else {}
    for name, table in (preset or {}).items():
        toml[name] = {**table, **toml.get(name, {})}
    cli = parse_overrides(overrides or [])
    known = sections(root_cls)
    for name, table in toml.items():
        if name not in known and not partial:
            raise ConfigError(f"{toml_path}: unknown section [{name}] (sections: {', '.join(known)})")
        if name in known and not isinstance(table, dict):
            raise ConfigError(f"{toml_path}: {name} must be a [{name}] table")
    for key in cli:
        section, _, fname = key.partition(".")
        if section not in known or fname not in field_types(known[section]):
            raise ConfigError(f"unknown option --{key}{did_you_mean(key, known)} (see --help for every field)")
    return root_cls(**{name: _build_section(name, cls, toml.get(name, {}), cli, toml_path,
                                            base=root_defaults(root_cls, name))
                       for name, cls in known.items()})


def _class_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def root_defaults(root_cls, name: str) -> dict:
    """The fields where the root's default for section `name` differs from the section class's own (a root may
    set other defaults for its command: `python -m trainer.rl`'s optimizer), so the loader starts from the defaults
    --help shows."""
    root_field = next(f for f in dataclasses.fields(root_cls) if f.name == name)
    section = _class_default(root_field)
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
            if f.init and getattr(section, f.name) != _class_default(f)}


def did_you_mean(key: str, known: dict[str, type]) -> str:
    """'; did you mean --section.field?' for the nearest field name, or ''."""
    fields = [f"{name}.{fname}" for name, cls in known.items() for fname in field_types(cls)]
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.8)
    return f"; did you mean --{close[0]}?" if close else ""


def _build_section(name: str, cls: type, table: dict, cli: dict[str, str], toml_path: str | None, *,
                   base: dict):
    types_ = field_types(cls)
    values = dict(base)
    for fname, value in table.items():
        if fname not in types_:
            raise ConfigError(f"{toml_path}: unknown field {name}.{fname}")
        values[fname] = coerce(value, types_[fname], f"{toml_path}: {name}.{fname}")
    for key, value in cli.items():
        section, _, fname = key.partition(".")
        if section == name and value == FLAG:
            if types_[fname] is not bool:
                raise ConfigError(f"--{key} needs a value")
            values[fname] = True
        elif section == name:
            values[fname] = coerce(value, types_[fname], f"--{key}")
    try:
        return cls(**values)
    except ValueError as exc:  # the section's __post_init__ check (the model file raises plain ValueError)
        raise ConfigError(str(exc)) from None


def to_dict(cfg) -> dict:
    """Sections as plain dicts, None fields dropped (TOML has no null)."""
    return {name: {k: v for k, v in dataclasses.asdict(getattr(cfg, name)).items() if v is not None}
            for name in sections(type(cfg))}


def from_dict(root_cls: type[T], data: dict) -> T:
    """Inverse of `to_dict` (values already typed, e.g. a config shipped to Ray workers)."""
    return root_cls(**{name: cls(**data.get(name, {})) for name, cls in sections(root_cls).items()})


def dump_toml(cfg) -> str:
    """The resolved config as TOML that `load_config` reads back to an equal config. A config is sections of
    scalars and lists, so it is written here: a GPU box with torch alone (no TOML writer) runs the trainer."""
    lines = []
    for name, values in to_dict(cfg).items():
        lines += [f"[{name}]", *(f"{json.dumps(k)} = {toml_value(v)}" for k, v in values.items()), ""]
    return "\n".join(lines)


def toml_value(value) -> str:
    """A TOML literal of a config value (bool, int, float, str, list or dict of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # TOML reads Python's repr of ints and floats, inf and nan included
    if isinstance(value, str):  # JSON's escapes are TOML's, once DEL (a control character to TOML) is escaped too
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"no TOML literal for {type(value).__name__} {value!r}")


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right under a field) of a dataclass and its bases, read from the source."""
    docs = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Union:  # `InPath | None` (`str | None`, a types.UnionType, prints as is)
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp).replace("typing.", "")


def config_help(root_cls) -> str:
    """Every field as `--section.field (type, default X): doc`, one line each, grouped by section; a doc that names
    its own default (`(default: one per CPU present)`) is not followed by the value that stands for it."""
    lines, defaults = [], root_cls()
    for name, cls in sections(root_cls).items():
        lines.append(f"[{name}]")
        docs = field_docs(cls)
        for fname, tp in field_types(cls).items():
            default, doc = getattr(getattr(defaults, name), fname), docs.get(fname, "")
            shown = "" if "(default" in doc else f", default {default!r}"  # the doc says what None stands for
            line = f"  --{name}.{fname} ({_type_name(tp)}{shown})"
            lines.append(f"{line}: {docs[fname]}" if fname in docs else line)
    return "\n".join(lines)
