"""Settings derived from the services' own config dataclasses.

A service declares each of its values once: a field of its frozen config dataclass, with
the default and a doc (the attribute docstring under the field, else its trailing or
leading comment). The daemon exposes a field as a config key by naming it in a
`Section` (`latticed.config.SECTIONS`), with the key's name when it differs (units:
``request_timeout`` -> ``request_timeout_s``) and the input checks a config file needs
(a minimum, a choice). From that, `derive` makes the `Setting` table that loading,
``latticed --print-config`` and the annotated-file test use, and `build` makes the
dataclass from loaded values. Nothing here knows any particular service.

Must not import libp2p (the daemon loads its config before it imports libp2p).
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import inspect
import io
import os
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "LATTICE_"

Check = Callable[[str, Any], Any]


class ConfigError(ValueError):
    """Bad configuration: names the key, the source and what is wrong."""

    def __init__(self, key: str, message: str, source: str = "") -> None:
        where = f" (from {source})" if source else ""
        super().__init__(f"{key}: {message}{where}")
        self.key = key


@dataclass(frozen=True)
class Exposed:
    """One dataclass field offered as a config key."""

    field: str
    key: str = ""
    """The key's name in its section, when it is not the field's name."""
    minimum: float | None = None
    choices: tuple[str, ...] = ()
    check: Check | None = None
    """Further validation: (key, value) -> value, raising `ConfigError`."""

    @property
    def name(self) -> str:
        return self.key or self.field


def expose(field: str, key: str = "", *, minimum: float | None = None,
           choices: Iterable[str] = (), check: Check | None = None) -> Exposed:
    return Exposed(field, key, minimum, tuple(choices), check)


@dataclass(frozen=True)
class Section:
    """Fields of one config dataclass shown in one ``[section]`` of the config file (a
    section may gather fields of several dataclasses; a dataclass may feed several)."""

    name: str
    owner: type
    fields: tuple[Exposed, ...]


@dataclass(frozen=True)
class Setting:
    """One config key, derived: its type, default and doc come from the owner's field."""

    key: str  # "section.name"
    type: type  # str, int, float, bool, list (of str) or Path
    default: Any
    doc: str
    owner: builtins.type  # (`type` is the field above here)
    field: str
    exposed: Exposed

    @property
    def env_name(self) -> str:
        section, name = self.key.split(".", 1)
        tail = name if section == "node" else f"{section}_{name}"
        return ENV_PREFIX + tail.upper()

    def validate(self, value: Any) -> Any:
        """Range, choice and custom checks of an already coerced value."""
        e = self.exposed
        if value is None:
            return value
        if e.choices:
            value = str(value).lower()
            if value not in e.choices:
                raise ConfigError(self.key, f"must be one of {', '.join(e.choices)}, "
                                            f"got {value!r}")
        if e.minimum is not None and value < e.minimum:
            raise ConfigError(self.key, f"must be at least {e.minimum}, got {value}")
        if e.check is not None:
            value = e.check(self.key, value)
        return value


def derive(sections: Iterable[Section]) -> list[Setting]:
    """The settings table, in section order. Raises TypeError for a field that does not
    exist, has no doc, or has a type a config file cannot hold (a bug in `sections`)."""
    out: list[Setting] = []
    seen: set[str] = set()
    for section in sections:
        fields = {f.name: f for f in dataclasses.fields(section.owner)}
        hints = typing.get_type_hints(section.owner)
        docs = field_docs(section.owner)
        for e in section.fields:
            key = f"{section.name}.{e.name}"
            where = f"{section.owner.__qualname__}.{e.field}"
            if e.field not in fields or key in seen:
                raise TypeError(f"config key {key}: no field {where}, or the key twice")
            if not docs.get(e.field):
                raise TypeError(f"config key {key}: {where} has no doc")
            seen.add(key)
            out.append(Setting(key, _config_type(hints[e.field], where),
                               _config_value(_default(fields[e.field])), docs[e.field],
                               section.owner, e.field, e))
    return out


def build(owner: type, settings: Iterable[Setting], values: Mapping[str, Any],
          **overrides: Any) -> Any:
    """An ``owner`` from the loaded values of its exposed fields (the rest keep the
    dataclass's defaults), then ``overrides``."""
    hints = typing.get_type_hints(owner)
    kwargs: dict[str, Any] = {}
    for s in settings:
        if s.owner is owner and values.get(s.key) is not None:
            value = values[s.key]
            kwargs[s.field] = tuple(value) if _origin(hints[s.field]) is tuple else value
    kwargs.update(overrides)
    return owner(**kwargs)


# -- reading the dataclasses ---------------------------------------------------------------


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"config field {f.name} has no default")


def _config_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _origin(hint: Any) -> Any:
    return typing.get_origin(hint) or hint


def _config_type(hint: Any, where: str) -> type:
    """The config file type of a field annotation (Optional unwrapped)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if _origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if hint in (bool, int, float, str, Path):
        return typing.cast(type, hint)
    if _origin(hint) in (tuple, list) and typing.get_args(hint)[:1] == (str,):
        return list
    raise TypeError(f"{where}: a config file cannot hold a {hint!r}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's doc, from the class source: the string right under the field, else
    the comment on its line, else the comment lines right above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    body = typing.cast(ast.ClassDef, ast.parse(source).body[0]).body
    docs: dict[str, str] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        after = body[i + 1] if i + 1 < len(body) else None
        if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            doc = after.value.value
        elif node.end_lineno in comments:
            doc = comments[node.end_lineno or 0]
        else:
            above: list[str] = []
            line = node.lineno - 1
            while line >= 1 and lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments.get(line, ""))
                line -= 1
            doc = " ".join(above)
        docs[node.target.id] = " ".join(doc.split())
    return docs


def coerce(setting: Setting, value: Any, source: str) -> Any:
    """A value from a file, the environment (strings) or a flag, as the setting's type."""
    t, key = setting.type, setting.key
    if value is None:
        return None
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(key, f"must be true or false, got {value!r}", source)
    if t in (int, float):
        what = "an integer" if t is int else "a number"
        accepted = (int, str) if t is int else (int, float, str)
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ConfigError(key, f"must be {what}, got {value!r}", source)
        try:
            return t(value)
        except ValueError:
            raise ConfigError(key, f"must be {what}, got {value!r}", source) from None
    if t is list:
        if isinstance(value, str):  # from the environment: comma or space separated
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"must be a list of strings, got {value!r}", source)
        return value
    if t is Path:
        if not isinstance(value, (str, Path)) or str(value) == "":
            raise ConfigError(key, f"must be a path, got {value!r}", source)
        return Path(os.path.expanduser(value))
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {value!r}", source)
    return value
