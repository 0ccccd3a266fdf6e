"""Options of a training run: each described once, in its dataclass field, from which the CLI flags come.

`option(default, help)` makes a dataclass field whose metadata holds the help text, the fixed set of
values where there is one (`choices`) and how a flag's text is parsed. The sub-configs that use it live
beside the code that reads them (`data.DataConfig`, `objective.RDSConfig`, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(",") if p.strip())


def parse_strings(text: str) -> tuple[str, ...]:
    return tuple(p for p in text.split(",") if p.strip())


def parse_floats(text: str) -> tuple[float, ...]:
    return tuple(float(p) for p in text.split(",") if p.strip())


def option(default: Any, help: str, *, parse: Callable[[str], Any] | None = None,
           choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its help text; `parse` (flag text -> value) defaults to the default's type."""
    if parse is None:
        parse = {bool: parse_bool, int: int, float: float, str: str}.get(type(default), str)
    metadata = {"help": help, "parse": parse, "choices": choices}
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default=tuple(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def tupled(value: Any) -> Any:
    """Lists (from YAML/JSON) and comma strings as tuples, so a frozen config holds no mutable values."""
    if isinstance(value, str):
        return tuple(p for p in value.split(",") if p.strip())
    return tuple(value) if isinstance(value, list) else value


class Section:
    """Base of the sub-configs: frozen dataclasses whose list values are tuples."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if isinstance(f.default, tuple) or f.metadata.get("parse") in (parse_strings, parse_ints, parse_floats):
                value = getattr(self, f.name)
                if value is not None:
                    object.__setattr__(self, f.name, tupled(value))
        self.check()

    def check(self) -> None:
        """Refuse values that are wrong on their own (not in combination with the runtime)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}


def need_at_least(section: Section, names: tuple[str, ...], low: int) -> None:
    for name in names:
        if getattr(section, name) < low:
            raise ValueError(f"{name} must be >= {low}, got {getattr(section, name)}")
