"""`loopus chat MODEL`: talk to a LoopUS model in the terminal and watch how deep it thinks per token.

Also the loop-setting flags `loopus serve` shares (`add_loop_arguments`).
"""

from __future__ import annotations

import argparse

from .convert import add_model_arguments, load_model

HELP = "chat with a LoopUS model in the terminal, showing loop passes per token"


def add_loop_arguments(p: argparse.ArgumentParser, scope: str) -> None:
    """--num-loops, --exit-strategy, --exit-threshold; checked once the model is loaded (`Engine`)."""
    p.add_argument("--num-loops", type=int, default=None,
                   help=f"loop budget: passes of the reasoning block per token ({scope}; default: the model's)")
    p.add_argument("--exit-strategy", default=None,
                   help=f"per-token early exit: threshold, cdf, convergence or kl ({scope}; default: none, "
                        "every token runs the whole budget)")
    p.add_argument("--exit-threshold", type=float, default=None,
                   help=f"threshold of the exit strategy ({scope}; default: the strategy's own)")


def loop_settings(args: argparse.Namespace):
    """The flags as `LoopSettings`, checked before the (slow) model load as far as they can be without it."""
    from ..config import check_num_loops
    from ..halting import ExitRule
    from ..serving.engine import LoopSettings

    budget = 1 if args.num_loops is None else check_num_loops(args.num_loops)
    ExitRule.build(args.exit_strategy, args.exit_threshold, None, budget)
    return LoopSettings(args.num_loops, args.exit_strategy, args.exit_threshold)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help=HELP)
    add_model_arguments(p)
    add_loop_arguments(p, "change it in the chat with /loops and /exit")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest reply in tokens (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (default %(default)s: greedy)")
    p.add_argument("--no-color", action="store_true",
                   help="mark each token's loop passes with a superscript digit instead of a colour")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from ..chat import ChatSession
    from ..serving.engine import Engine, sampling_kwargs

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling_kwargs(args.temperature, None)
    settings = loop_settings(args)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(args)
    engine = Engine(model, tokenizer, args.model)
    session = ChatSession(engine, settings, args.max_new_tokens, args.temperature,
                          color=not args.no_color and sys.stdout.isatty())
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    session.run()
    return 0
