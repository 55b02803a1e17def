"""Config loading: dataclass defaults < TOML file < `--section.field=value` on the command line.

A root config is a dataclass whose fields are section dataclasses (e.g. `JobConfig(model=ModelConfig, …)`). Every
mistake (unknown section or field, a value of the wrong type, a failed check in a section's `__post_init__`) is a
`ConfigError` naming the field, the value and where it came from.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from functools import lru_cache
from typing import Any, TypeVar

import tomli_w

from dataprep.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def sections(root_cls) -> dict[str, type]:
    hints = typing.get_type_hints(root_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(root_cls)}


def field_types(section_cls) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` (from TOML or a CLI string) as type `tp`, or a ConfigError naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin in (list, tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        items = [_coerce(v.strip() if isinstance(v, str) else v, args[0], where) for v in items if v != ""]
        return items if origin is list else tuple(items)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in _TRUE | _FALSE:
                return str(value).lower() in _TRUE
            raise ValueError
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if tp is float and isinstance(value, bool) or tp is int and isinstance(value, bool):
            raise ValueError
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r} is not a valid {getattr(tp, '__name__', tp)}") from None


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`--section.field=value` / `--section.field value` → {'section.field': 'value'}."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.field=value (see --help)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value")
            value, i = args[i + 1], i + 1
        out[key] = value
        i += 1
    return out


def _read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc})") from None


def load_config(root_cls: type[T], toml_path: str | None = None, overrides: list[str] | None = None) -> T:
    """Build `root_cls` from its defaults, then the TOML file, then CLI overrides."""
    toml = _read_toml(toml_path) if toml_path else {}
    cli = parse_overrides(overrides or [])
    known = sections(root_cls)
    for name in toml:
        if name not in known:
            raise ConfigError(f"{toml_path}: unknown section [{name}] (sections: {', '.join(known)})")
    for key in cli:
        section, _, fname = key.partition(".")
        if section not in known or fname not in field_types(known[section]):
            raise ConfigError(f"unknown option --{key} (see --help for the fields of each section)")
    built = {}
    for name, cls in known.items():
        values: dict[str, Any] = {}
        types = field_types(cls)
        for fname, value in toml.get(name, {}).items():
            if fname not in types:
                raise ConfigError(f"{toml_path}: unknown field {name}.{fname}")
            values[fname] = _coerce(value, types[fname], f"{toml_path}: {name}.{fname}")
        for key, value in cli.items():
            if key.startswith(name + "."):
                fname = key.split(".", 1)[1]
                values[fname] = _coerce(value, types[fname], f"--{key}")
        try:
            built[name] = cls(**values)
        except ValueError as exc:  # a section's own __post_init__ check (plain ValueError in the model file)
            raise ConfigError(str(exc)) from None
    return root_cls(**built)


def to_dict(cfg) -> dict:
    """Sections as plain dicts, None fields dropped (TOML has no null)."""
    return {name: {k: v for k, v in dataclasses.asdict(getattr(cfg, name)).items() if v is not None}
            for name in sections(type(cfg))}


def from_dict(root_cls: type[T], data: dict) -> T:
    return root_cls(**{name: cls(**data.get(name, {})) for name, cls in sections(root_cls).items()})


def dump_toml(cfg) -> str:
    return tomli_w.dumps(to_dict(cfg))


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right under a field) of a dataclass, read from its source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def config_help(root_cls) -> str:
    """Every field as `--section.field (type, default X): doc`, grouped by section."""
    lines = []
    defaults = root_cls()
    for name, cls in sections(root_cls).items():
        lines.append(f"[{name}]")
        docs = field_docs(cls)
        for fname, tp in field_types(cls).items():
            default = getattr(getattr(defaults, name), fname)
            lines.append(f"  --{name}.{fname} ({_type_name(tp)}, default {default!r})")
            if fname in docs:
                lines.append(f"      {docs[fname]}")
    return "\n".join(lines)
