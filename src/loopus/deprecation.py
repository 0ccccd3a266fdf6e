"""Renamed keywords and command-line flags: the old spelling keeps working for one release, with a warning.

Scripts written against an earlier release keep running; the warning names the new spelling.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any


def renamed_keyword(owner: str, old: str, new: str, old_value: Any, new_value: Any) -> Any:
    """The value of keyword `new` of `owner`, taking its deprecated spelling `old` with a DeprecationWarning."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"{owner}() got both {new}= and its old name {old}=: pass {new}= only")
    warnings.warn(f"{owner}({old}=...) is deprecated and will be removed: use {new}=", DeprecationWarning,
                  stacklevel=3)
    return old_value


class _OldFlag(argparse.Action):
    """A hidden old spelling of a flag: stores into the new flag's destination and warns once per process."""

    warned: set[str] = set()

    def __init__(self, option_strings: list[str], dest: str, new_flag: str = "", **kwargs: Any):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string not in _OldFlag.warned:
            _OldFlag.warned.add(option_string)
            print(f"loopus: warning: {option_string} is deprecated and will be removed: use {self.new_flag}",
                  file=sys.stderr, flush=True)
        setattr(namespace, self.dest, values)


def add_old_flag(parser: argparse.ArgumentParser, old: str, new: argparse.Action) -> None:
    """Accept `old` as a hidden, warning alias of the flag `new` (same type and choices)."""
    parser.add_argument(old, dest=new.dest, type=new.type, choices=new.choices, action=_OldFlag,
                        new_flag=new.option_strings[0], default=argparse.SUPPRESS, help=argparse.SUPPRESS)
