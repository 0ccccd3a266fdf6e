"""`loopus convert BASE --encoder-layers N --decoder-layers N --out DIR`."""

from __future__ import annotations

import argparse


def parse_layers(text: str) -> int | list[int]:
    """`4` means a count; `0,1,2` is an explicit index list."""
    parts = [p for p in text.split(",") if p.strip()]
    if "," not in text:
        return int(text)
    return [int(p) for p in parts]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="recast a pretrained causal LM as a LoopUS model")
    p.add_argument("base", help="embedded name (gemma-3-270m), checkpoint directory or hub id")
    p.add_argument("--encoder-layers", type=parse_layers, required=True, help="count N, or indices 0,1,2")
    p.add_argument("--decoder-layers", type=parse_layers, required=True, help="count N, or indices 15,16,17")
    p.add_argument("--out", required=True, help="output directory (save_pretrained format)")
    p.add_argument("--num-loops", type=int, default=4, help="default loop count stored in the config")
    p.add_argument("--gate-rank", type=int, default=64)
    p.add_argument("--gate-init", type=float, default=0.5)
    p.add_argument("--kv-mode", choices=["per_depth", "shared"], default="per_depth")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..convert import convert
    from ..zoo import load_base

    base, tokenizer = load_base(args.base)
    model = convert(
        base,
        args.encoder_layers,
        args.decoder_layers,
        num_loops=args.num_loops,
        gate_rank=args.gate_rank,
        gate_init=args.gate_init,
        kv_mode=args.kv_mode,
    )
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    cfg = model.config
    print(
        f"saved LoopUS model to {args.out}: encoder {cfg.encoder_layers} layers, reasoning layers "
        f"{cfg.reasoning_range.start}..{cfg.reasoning_range.stop - 1}, decoder {cfg.decoder_layers} layers"
    )
    return 0
