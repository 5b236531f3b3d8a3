"""Plain data (parsed YAML + overrides) -> schema dataclasses, checking keys, types and bounds.

Errors carry the dotted ``key`` but no location; the loader attributes them to a file line or an
override. Accepted conversions: int for float, an integral float for int; nothing else (no bool
for int, no number for str). A section given as null takes its defaults.
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from .errors import ConfigError, nearest

_NoneType = type(None)


class _Mismatch(Exception):
    """A value does not fit a type; turned into a ConfigError naming the field's full type."""


def build(cls: type, data: Any, prefix: str = "", root: type | None = None) -> Any:
    """An instance of dataclass ``cls`` from mapping ``data``; missing keys take defaults.

    ``prefix`` is the dotted key of ``data`` inside the ``root`` schema (for messages).
    """
    root = root or cls
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix}' is a section and expects a mapping of keys, got {_show(data)}", key=prefix)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = _join(prefix, str(name))
        if name not in fields:
            raise ConfigError(f"unknown key '{key}'{_suggest(cls, prefix, str(name), root)}", key=key)
        tp = hints[name]
        values[name] = (build(tp, value, key, root) if dataclasses.is_dataclass(tp)
                        else _convert_field(tp, value, key, fields[name].metadata))
    return cls(**values)


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of dataclass ``cls`` (sections expanded)."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        key = _join(prefix, name)
        keys += schema_keys(tp, key) if dataclasses.is_dataclass(tp) else [key]
    return keys


#: Keys an earlier release had, with the key (and values) replacing them.
RENAMED_KEYS = {
    "training.activation_checkpointing": "training.recompute (none|selective|full; "
                                         "activation_checkpointing=true is recompute=full)",
}


def _suggest(cls: type, prefix: str, name: str, root: type) -> str:
    """The key that replaced a renamed one, else the nearest key in the same section, else the
    nearest same-named key in another section."""
    if _join(prefix, name) in RENAMED_KEYS:
        return f"; it was renamed: use {RENAMED_KEYS[_join(prefix, name)]}"
    siblings = [f.name for f in dataclasses.fields(cls)]
    close = nearest(name, siblings, n=1)
    if close:
        return f"; did you mean '{_join(prefix, close[0])}'?"
    leaves = {key.rsplit(".", 1)[-1]: key for key in reversed(schema_keys(root))}
    close = nearest(name, leaves, n=1)
    if close:
        return f"; did you mean '{leaves[close[0]]}'?"
    return f"; valid keys in '{prefix or '<top level>'}': {', '.join(siblings)}"


def _convert_field(tp: Any, value: Any, key: str, meta: Mapping[str, Any]) -> Any:
    try:
        value = _coerce(tp, value)
    except _Mismatch:
        choices = _literal_strings(tp)
        hint = _closest(value, choices)
        if typing.get_origin(tp) is list:
            items = _literal_strings(typing.get_args(tp)[0])
            if isinstance(value, list):  # the nearest name to the item at fault
                hint = next((h for h in (_closest(v, items) for v in value) if h), "")
            elif isinstance(value, str):
                hint = f"; give a list, e.g. [{value}]"
        if tp in (str, str | None) and isinstance(value, (int, float)):
            hint = f"; quote it to pass a string, e.g. \"{value}\""
        raise ConfigError(f"'{key}' expects {_describe(tp)}, got {_show(value)}{hint}", key=key) from None
    _check_meta(value, key, meta)
    return value


def _coerce(tp: Any, value: Any) -> Any:
    """``value`` converted to ``tp``, or raise _Mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and _NoneType in args:
            return None
        for arg in (a for a in args if a is not _NoneType):
            try:
                return _coerce(arg, value)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Mismatch
    if origin is list and isinstance(value, list):
        return [_coerce(args[0], v) for v in value]
    if origin is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _coerce(args[1], v) for k, v in value.items()}
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise _Mismatch


def _check_meta(value: Any, key: str, meta: Mapping[str, Any]) -> None:
    if value is None:
        return
    for bound, holds, text in (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<=")):
        if bound in meta and not holds(value, meta[bound]):
            raise ConfigError(f"'{key}' must be {text} {meta[bound]}, got {value!r}", key=key)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"'{key}' expects one of {options}, got {value!r}{_closest(value, choices)}", key=key)


def _describe(tp: Any) -> str:
    """A type as a user reads it: ``int``, ``float or null``, ``one of 'a', 'b'``, ``list of str``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not _NoneType]
        return " or ".join(parts + (["null"] if _NoneType in args else []))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return "a mapping"
    if tp is float:
        return "float (or int)"
    return "any value" if tp is Any else tp.__name__


def _closest(value: Any, options: list[str] | tuple[str, ...]) -> str:
    close = nearest(value, options, n=1) if isinstance(value, str) else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _literal_strings(tp: Any) -> list[str]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [s for a in typing.get_args(tp) for s in _literal_strings(a)]
    return [a for a in typing.get_args(tp) if isinstance(a, str)] if typing.get_origin(tp) is Literal else []


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
