"""The `loopus` command. Each verb lives in `loopus/commands/<verb>.py` with `register(subparsers)`.

Only the verb being run builds its full argument parser; the others are listed by their module's `HELP`.
Command modules import torch, transformers and lm-eval inside their functions, so `loopus --help` and
argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands
from .errors import LoopUSError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return help_text
        return super()._get_help_string(action)


class VerbParser(argparse.ArgumentParser):
    """A verb's parser: defaults shown in the help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _verb(argv: list[str]) -> str | None:
    """The verb named on the command line (its first word that is not an option), if any."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the verb it names is built in full (None: every verb)."""
    parser = argparse.ArgumentParser(prog="loopus", description="Recast pretrained LLMs as looped LoopUS models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=VerbParser)
    chosen = None if argv is None else _verb(argv)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        name = info.name.replace("_", "-")
        if argv is not None and name != chosen and hasattr(module, "HELP"):
            subparsers.add_parser(name, help=module.HELP, add_help=False)
        else:
            module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.extra = extra
    try:
        import loopus

        loopus.register()  # the command line skips it at import (see loopus/__init__.py)
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
