"""The `loopus` command. Each verb lives in `loopus/commands/<verb>.py` with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopus", description="Recast pretrained LLMs as looped LoopUS models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.extra = extra
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as err:
        # Bad input ends in one clear line naming the problem, not a traceback.
        print(f"loopus {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
