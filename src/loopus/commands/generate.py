"""`loopus generate MODEL PROMPT`: stream a continuation from a LoopUS model, with per-token loop counts.

MODEL is a LoopUS checkpoint directory (`loopus convert --out DIR`, or a trained one), or a base
model (embedded name such as gemma-3-270m, checkpoint directory, hub id) together with a split
(--encoder-layers / --decoder-layers, or --split), converted on the fly (untrained gate and confidence head).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..deprecation import add_old_flag
from ..options import EXIT_STRATEGIES, KV_MODES
from .convert import add_model_arguments, load_model

HELP = "generate text with looped decoding and adaptive exit"
COLOURS = {1: 32, 2: 36, 3: 34, 4: 35}  # ANSI: green, cyan, blue, magenta; deeper loops are red
COLOUR_NAMES = {32: "green", 36: "cyan", 34: "blue", 35: "magenta", 31: "red"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help=HELP)
    add_model_arguments(p)
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (default: read stdin)")
    loops = p.add_argument("--num-loops", type=int, default=None, help="loop budget (default: the model's num_loops)")
    p.add_argument("--min-loops", type=int, default=None, help="fewest loops before a token may exit (default: 1)")
    strategy = p.add_argument("--exit-strategy", choices=["none", *EXIT_STRATEGIES], default="none",
                              help="per-token exit strategy")
    threshold = p.add_argument("--exit-threshold", type=float, default=None,
                               help="exit threshold (default: the strategy's own)")
    p.add_argument("--prefill-exit", action="store_true", help="apply the exit rule to the prompt too (per sequence)")
    p.add_argument("--kv-mode", choices=KV_MODES, default=None, help="KV cache layout (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the model's)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling share (default: the model's)")
    p.add_argument("--top-k", type=int, default=None, help="top-k sampling (default: the model's)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: none)")
    p.add_argument(
        "--show-loops",
        choices=["off", "number", "color"],
        default="off",
        help="mark each generated token with its loop count: [n] after it, or an ANSI colour with a legend "
        "(on a terminal; [n] when the output is piped)",
    )
    p.add_argument("--stats-json", default=None, help="also write the loop statistics to this JSON file")
    add_old_flag(p, "--max-loops", loops)
    add_old_flag(p, "--strategy", strategy)
    add_old_flag(p, "--threshold", threshold)
    p.set_defaults(handler=run)


def colour_legend(num_loops: int) -> str:
    """Which colour marks which loop count, each in its colour."""
    shown = [(str(n), code) for n, code in sorted(COLOURS.items()) if n <= num_loops]
    if num_loops > max(COLOURS):
        shown.append((f"{max(COLOURS) + 1}+", 31))
    return "[loops] colour = loop count: " + ", ".join(
        f"\033[{code}m{label} {COLOUR_NAMES[code]}\033[0m" for label, code in shown)


class LoopStreamer:
    """A transformers streamer (put/end) that prints each new token as it comes, with its loop count.

    The serving engine's per-token streamer does the decoding (`generate` calls `put` after every step
    with the token just chosen; the cache's last recorded loop-pass count is that of the forward that
    chose it); this one prints its pieces.
    """

    def __init__(self, tokenizer, cache, show: str, out=None):
        from ..serving.engine import DepthStreamer  # here, not at the top: `loopus --help` must not load torch

        # sys.stdout is read when streaming starts, not at import (it may have been replaced since)
        self.out = out or sys.stdout
        # colour codes in a file or a pipe are noise: there the marker form is used instead
        is_terminal = getattr(self.out, "isatty", lambda: False)()
        self.show = "number" if show == "color" and not is_terminal else show
        self.passes: list[int] = []
        self.pieces = DepthStreamer(tokenizer, cache, on_piece=self.print)

    def print(self, piece) -> None:
        text = piece.text
        if piece.token is not None:
            self.passes.append(piece.passes)
            if self.show == "number":
                text = f"{text}[{piece.passes}]"
            elif self.show == "color":
                text = f"\033[{COLOURS.get(piece.passes, 31)}m{text}\033[0m"
        self.out.write(text)
        self.out.flush()

    def put(self, value) -> None:
        self.pieces.put(value)

    def end(self) -> None:
        self.pieces.end()
        self.out.write("\n")
        self.out.flush()


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import set_seed

    from ..cache import loop_stats
    from ..compat import GENERATION_CACHE_KWARG
    from ..halting import ExitRule

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_loops is not None and args.num_loops < 1:
        raise ValueError(f"--num-loops must be >= 1, got {args.num_loops}")
    strategy = None if args.exit_strategy == "none" else args.exit_strategy
    if strategy is None and args.exit_threshold is not None:
        raise ValueError("--exit-threshold needs --exit-strategy")
    if args.num_loops is not None:  # check the knobs before the (slow) model load
        ExitRule.build(strategy, args.exit_threshold, args.min_loops, args.num_loops)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("empty prompt")

    model, tokenizer = load_model(args)
    num_loops = args.num_loops or model.config.num_loops
    ExitRule.build(strategy, args.exit_threshold, args.min_loops, num_loops)
    if args.seed is not None:
        set_seed(args.seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    cache = model.new_cache(num_loops, args.kv_mode)
    streamer = LoopStreamer(tokenizer, cache, args.show_loops)
    if streamer.show == "color":
        print(colour_legend(num_loops), file=sys.stderr)
    elif args.show_loops == "color":
        print("[loops] stdout is not a terminal: loop counts are marked as [n] instead of colours", file=sys.stderr)
    sampling = {}
    if args.do_sample:
        sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k))
                    if v is not None}
    elif any(v is not None for v in (args.temperature, args.top_p, args.top_k)):
        raise ValueError("--temperature/--top-p/--top-k only apply with --do-sample")
    sys.stdout.write(prompt)
    with torch.no_grad():
        model.generate(
            **inputs,
            **{GENERATION_CACHE_KWARG: cache},
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            streamer=streamer,
            num_loops=num_loops,
            exit_strategy=strategy,
            exit_threshold=args.exit_threshold,
            min_loops=args.min_loops,
            prefill_exit=args.prefill_exit,
            **sampling,
        )
    stats = loop_stats(torch.tensor(streamer.passes, dtype=torch.long))
    hist = " ".join(f"{n}:{c}" for n, c in sorted(stats["histogram"].items()))
    print(
        f"[loops] {stats['tokens']} tokens, mean {stats['mean']:.2f} of budget {num_loops} "
        f"(strategy {args.exit_strategy}, kv {cache.kv_mode}); histogram {hist}",
        file=sys.stderr,
    )
    if args.stats_json:
        Path(args.stats_json).write_text(
            json.dumps({"num_loops": num_loops, "strategy": args.exit_strategy, "kv_mode": cache.kv_mode,
                        "token_loops": streamer.passes, **stats}, indent=2)
        )
    return 0
