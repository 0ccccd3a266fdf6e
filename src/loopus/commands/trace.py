"""`loopus trace MODEL --prompt TEXT --out DIR`: what the loop does to a prompt (PNG, JSON, HTML, table)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import is_loopus_checkpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "trace",
        help="trace a prompt through the loop: PCA of states, gate, step sizes, thinking trace",
        description="MODEL is a LoopUS checkpoint directory, or a base model (embedded name, checkpoint "
        "directory, hub id) with --split E,D / --split split.json / --split auto / --encoder-layers and "
        "--decoder-layers. Writes trace.png, trace.json, trace.html and thinking_trace.txt to --out.",
    )
    p.add_argument("model", help="LoopUS checkpoint directory, or a base model with a split")
    p.add_argument("--prompt", required=True, help="text to trace")
    p.add_argument("--num-loops", type=int, default=8, help="loops to run (default 8)")
    p.add_argument("--top-k", type=int, default=3, help="candidates kept per loop and position (default 3)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", default=None, help="for a base model: E,D counts, a split.json, or auto")
    p.add_argument("--encoder-layers", type=int, default=None)
    p.add_argument("--decoder-layers", type=int, default=None)
    p.add_argument("--data", default=None, help="data directory for --split auto (default: $LOOPUS_DATA)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's own)")
    p.add_argument("--quiet", action="store_true", help="do not print the thinking-trace table")
    p.set_defaults(handler=run)


def load_model(args: argparse.Namespace):
    """(LoopUS model, tokenizer) from a checkpoint dir, or a base model converted with the given split."""
    from transformers import AutoTokenizer

    import loopus  # noqa: F401  (registers the Auto classes)

    from ..convert import convert
    from ..modeling import LoopUSForCausalLM
    from .convert import parse_split

    path = Path(args.model)
    has_split = args.split is not None or args.encoder_layers is not None or args.decoder_layers is not None
    if is_loopus_checkpoint(path):
        if has_split:
            raise ValueError(f"{path} is a LoopUS checkpoint with its own split: leave out --split/--encoder-layers")
        model = LoopUSForCausalLM.from_pretrained(path)
        source = args.tokenizer or path
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"no tokenizer in {source}: pass --tokenizer DIR ({err})") from None
        return model.eval(), tokenizer
    if not has_split:
        raise ValueError(
            f"{args.model} is not a LoopUS checkpoint: give a split for the base model "
            "(--split E,D, --split split.json, --split auto, or --encoder-layers/--decoder-layers)"
        )
    from ..zoo import load_base

    base, tokenizer = load_base(args.model)
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.split is not None:
        if args.encoder_layers is not None or args.decoder_layers is not None:
            raise ValueError("give either --split or --encoder-layers/--decoder-layers, not both")
        model = convert(base, split=parse_split(args.split), tokenizer=tokenizer, data=args.data)
    else:
        if args.encoder_layers is None or args.decoder_layers is None:
            raise ValueError("give both --encoder-layers and --decoder-layers")
        model = convert(base, args.encoder_layers, args.decoder_layers)
    return model.eval(), tokenizer


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
