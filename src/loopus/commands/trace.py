"""`loopus trace MODEL --prompt TEXT --out DIR`: what the loop does to a prompt (PNG, JSON, HTML, table)."""

from __future__ import annotations

import argparse

from .convert import add_model_arguments, load_model

HELP = "trace a prompt through the loop: PCA of states, gate, step sizes, thinking trace"
DESCRIPTION = ("MODEL is a LoopUS checkpoint directory, or a base model (embedded name, checkpoint directory, hub "
               "id) with --split E,D / --split split.json / --split auto / --encoder-layers and --decoder-layers. "
               "Writes trace.png, trace.json, trace.html and thinking_trace.txt to --out.")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("trace", help=HELP, description=DESCRIPTION)
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="text to trace")
    p.add_argument("--num-loops", type=int, default=8, help="loops to run (default 8)")
    p.add_argument("--top-k", type=int, default=3, help="candidates kept per loop and position (default 3)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true", help="do not print the thinking-trace table")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..trace import thinking_table, trace_loops, write_trace

    if args.num_loops < 1:
        raise ValueError(f"--num-loops must be >= 1, got {args.num_loops}")
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    model, tokenizer = load_model(args)
    trace = trace_loops(model, tokenizer, args.prompt, num_loops=args.num_loops, top_k=args.top_k)
    files = write_trace(trace, args.out)
    if not args.quiet:
        print(thinking_table(trace))
    print(f"wrote {', '.join(files.values())}")
    return 0
