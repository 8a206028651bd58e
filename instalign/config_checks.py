"""The checks every config field goes through, and a dataclass tree built from a plain mapping.

``instalign.config`` declares the fields; this is the machinery under them: :class:`ConfigError`
(one line naming the key and what is wrong), :func:`check` and :func:`check_literal` for the
``__post_init__`` of each dataclass, and :func:`build_dataclass`, which turns the mapping read
from YAML into the typed tree — unknown keys refused with the valid ones listed, each value
checked against its type hint (ints are accepted for floats, nothing else is converted).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from instalign.errors import InstAlignError

__all__ = ["ConfigError", "check", "check_literal", "build_dataclass", "to_plain"]


class ConfigError(InstAlignError, ValueError):
    """A config value, key or file is invalid; the message names it."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_literal(obj: Any, name: str) -> None:
    """Validate a ``Literal`` field against its allowed values."""
    hints = typing.get_type_hints(type(obj))
    allowed = typing.get_args(hints[name])
    value = getattr(obj, name)
    check(value in allowed, f"{type(obj).__name__}.{name}={value!r}: expected one of {list(allowed)}")


def to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if origin is Literal:
        return value  # validated in __post_init__ with the allowed values named
    if origin in (Union, types.UnionType):  # Optional[X] and X | None alike
        for arm in typing.get_args(hint):
            try:
                return _coerce(value, arm, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {hint}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arm, *_) = typing.get_args(hint) or (Any,)
        items = [_coerce(v, arm, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value
