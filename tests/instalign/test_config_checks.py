"""The machinery under every config field (``instalign.config_checks``): a typed tree built from a
plain mapping, each wrong key or value refused in one line naming it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from instalign.config_checks import ConfigError, build_dataclass, check, check_literal, to_plain


@dataclass
class Inner:
    lr: float = 1.0
    mode: Literal["a", "b"] = "a"

    def __post_init__(self) -> None:
        check_literal(self, "mode")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")


@dataclass
class Outer:
    steps: int = 1
    name: Optional[str] = None
    sizes: tuple[int, ...] = (1,)
    inner: Inner = field(default_factory=Inner)


def test_a_mapping_becomes_the_typed_tree_ints_accepted_for_floats():
    built = build_dataclass(Outer, {"steps": 3, "sizes": [2, 4], "inner": {"lr": 2, "mode": "b"}}, "cfg")
    assert built == Outer(steps=3, sizes=(2, 4), inner=Inner(lr=2.0, mode="b"))
    assert type(built.inner.lr) is float and type(built.sizes) is tuple
    assert to_plain({"a": (1, [2, (3,)])}) == {"a": [1, [2, [3]]]}


@pytest.mark.parametrize("data, message", [
    ({"stepz": 1}, r"cfg: unknown key\(s\) \['stepz'\]; valid keys: \['inner', 'name', 'sizes', 'steps'\]"),
    ({"steps": True}, r"cfg.steps: expected int, got True"),
    ({"steps": "3"}, r"cfg.steps: expected int, got '3'"),
    ({"sizes": 3}, r"cfg.sizes: expected a list, got 3"),
    ({"inner": []}, r"cfg.inner: expected a mapping, got list"),
    ({"inner": {"mode": "c"}}, r"cfg.inner: Inner.mode='c': expected one of \['a', 'b'\]"),
    ({"inner": {"lr": -1}}, r"cfg.inner: lr must be > 0, got -1.0"),
])
def test_each_wrong_key_or_value_is_one_error_naming_it(data, message):
    with pytest.raises(ConfigError, match=message):
        build_dataclass(Outer, data, "cfg")


@dataclass
class Optionals:
    name: Optional[str] = None
    label: str | None = None
    scale: float | None = None


@pytest.mark.parametrize("data, message", [
    ({"name": 5}, r"cfg.name: 5 does not match"),
    ({"label": 5}, r"cfg.label: 5 does not match"),
    ({"scale": "big"}, r"cfg.scale: 'big' does not match"),
])
def test_an_optional_field_takes_its_type_or_null_only(data, message):
    # The null arm once accepted anything: a str field took 5 (typing.Optional and X | None alike).
    with pytest.raises(ConfigError, match=message):
        build_dataclass(Optionals, data, "cfg")
    built = build_dataclass(Optionals, {"name": "a", "label": None, "scale": 2}, "cfg")
    assert built == Optionals(name="a", label=None, scale=2.0) and type(built.scale) is float
