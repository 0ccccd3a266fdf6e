"""`loopus analyze BASE --data D --out DIR`: representation dynamics per layer and the split they imply."""

from __future__ import annotations

import argparse

from ..options import CALIBRATION_TOKENS

HELP = "measure per-layer representation dynamics and choose the encoder/reasoning/decoder split"


def add_constraint_arguments(p: argparse.ArgumentParser) -> None:
    from ..split import SplitConstraints

    defaults = SplitConstraints()
    g = p.add_argument_group("split constraints")
    g.add_argument("--min-encoder", type=int, default=defaults.min_encoder,
                   help="fewest encoder layers (default %(default)s)")
    g.add_argument("--min-decoder", type=int, default=defaults.min_decoder,
                   help="fewest decoder layers (default %(default)s)")
    g.add_argument(
        "--min-reasoning",
        type=float,
        default=defaults.min_reasoning,
        help="fewest reasoning layers: a count (>= 1) or a share of all layers (< 1; default %(default)s)",
    )
    g.add_argument("--max-encoder", type=int, default=None, help="most encoder layers (default: no limit)")
    g.add_argument("--max-decoder", type=int, default=None, help="most decoder layers (default: no limit)")


def constraints_from(args: argparse.Namespace):
    """The `loopus.split.SplitConstraints` of the flags `add_constraint_arguments` adds."""
    from ..split import SplitConstraints

    if args.min_reasoning <= 0:
        raise ValueError(f"--min-reasoning must be > 0, got {args.min_reasoning}")
    if args.min_reasoning >= 1 and args.min_reasoning != int(args.min_reasoning):
        raise ValueError(f"--min-reasoning >= 1 is a layer count and must be whole, got {args.min_reasoning}")
    return SplitConstraints(
        min_encoder=args.min_encoder,
        min_decoder=args.min_decoder,
        min_reasoning=args.min_reasoning,
        max_encoder=args.max_encoder,
        max_decoder=args.max_decoder,
    )


def add_calibration_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--data, --calibration, --tokens: the text the split analysis reads (`analyze`, `convert --split auto`)."""

    p.add_argument("--data", default=None,
                   help="data directory (default: $LOOPUS_DATA), or a .jsonl/.txt file that is the calibration text")
    p.add_argument(
        "--calibration",
        default=None,
        help="calibration file: .jsonl with a 'text' field or plain text, absolute or relative to the data dir "
        "(default: enwiki/valid.jsonl)",
    )
    p.add_argument("--tokens", type=int, default=CALIBRATION_TOKENS, help="calibration tokens (default %(default)s)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help=HELP,
        description="Runs the base model on calibration text, measures per layer the cosine similarity of "
        "consecutive hidden states, the relative update norm, linear CKA and the logit-lens KL, chooses "
        "(encoder, decoder) layer counts by three-segment change-point detection, and writes split.json and "
        "dynamics.png to --out.",
    )
    p.add_argument("base", help="embedded name (gemma-3-270m), checkpoint directory or hub id")
    add_calibration_arguments(p)
    p.add_argument("--window", type=int, default=512, help="tokens per forward pass, BOS included (default 512)")
    p.add_argument(
        "--lens-tokens",
        type=int,
        default=128,
        help="positions the logit lens (a full-vocabulary projection per layer) runs on; 0 = off (default 128)",
    )
    p.add_argument("--out", required=True, help="output directory for split.json and dynamics.png")
    add_constraint_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..dynamics import analyze
    from ..zoo import load_base

    constraints = constraints_from(args)
    base, tokenizer = load_base(args.base)
    result = analyze(
        base,
        tokenizer,
        data=args.data,
        calibration=args.calibration,
        tokens=args.tokens,
        window=args.window,
        lens_tokens=args.lens_tokens,
        constraints=constraints,
        out=args.out,
        progress=not args.no_progress,
        name=args.base,
    )
    split = result["split"]
    lo, hi = split["reasoning_layers"]
    print(
        f"split for {args.base} ({result['num_layers']} layers): encoder {split['encoder_layers']}, "
        f"reasoning layers {lo}..{hi}, decoder {split['decoder_layers']}"
    )
    for reason in result["reasons"]:
        print(f"  - {reason}")
    print(f"wrote {' and '.join(result['files'])}")
    print(f"use it: loopus convert {args.base} --split {args.out}/split.json --out DIR")
    return 0
