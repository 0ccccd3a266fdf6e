"""The `loopus` command. Each verb lives in `loopus/commands/<verb>.py` with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands
from .errors import LoopUSError
from .paths import restored_data_env


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
        with restored_data_env():
            return int(args.handler(args) or 0)
    except (LoopUSError, ValueError, FileNotFoundError) as err:
        # Refused input ends in one line naming the problem; anything else is a bug and keeps its traceback.
        _end_progress_bars()
        print(f"loopus {args.command}: error: {err}", file=sys.stderr, flush=True)
        return 2


def _end_progress_bars() -> None:
    """Close progress bars the failed command left open, so the error line starts a line of its own.

    An open tqdm bar leaves the cursor after its text (it redraws with a carriage return, never a
    newline); closing it ends that line, and a bar left open would otherwise redraw itself over or
    after the error when it is garbage-collected.
    """
    sys.stdout.flush()
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) if tqdm else ()):
        try:
            bar.close()
        except Exception:  # a bar on a closed stream: nothing left to end
            pass
    sys.stderr.flush()


if __name__ == "__main__":
    raise SystemExit(main())
