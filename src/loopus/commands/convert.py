"""`loopus convert BASE (--encoder-layers N --decoder-layers N | --split auto|FILE|E,D) --out DIR`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .analyze import add_calibration_arguments, add_constraint_arguments, constraints_from


def parse_layers(text: str) -> int | list[int]:
    """`4` means a count; `0,1,2` is an explicit index list."""
    parts = [p for p in text.split(",") if p.strip()]
    if "," not in text:
        return int(text)
    return [int(p) for p in parts]


def parse_split(text: str) -> str | tuple[int, int]:
    """`auto`, a split.json path (or the directory holding one), or `E,D` counts."""
    if text == "auto":
        return text
    parts = text.split(",")
    if len(parts) == 2 and all(p.strip().lstrip("-").isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return text


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="recast a pretrained causal LM as a LoopUS model")
    p.add_argument("base", help="embedded name (gemma-3-270m), checkpoint directory or hub id")
    p.add_argument("--encoder-layers", type=parse_layers, default=None, help="count N, or indices 0,1,2")
    p.add_argument("--decoder-layers", type=parse_layers, default=None, help="count N, or indices 15,16,17")
    p.add_argument(
        "--split",
        type=parse_split,
        default=None,
        help="instead of --encoder-layers/--decoder-layers: 'auto' (analyze the base model on calibration "
        "text from --data and choose), a split.json from `loopus analyze`, or E,D counts",
    )
    p.add_argument("--out", required=True, help="output directory (save_pretrained format)")
    p.add_argument("--num-loops", type=int, default=4, help="default loop count stored in the config")
    p.add_argument("--gate-rank", type=int, default=64)
    p.add_argument("--gate-init", type=float, default=0.02,
                   help="gate share at init; 0.02 keeps every loop count near the base model (0.5: the paper's)")
    p.add_argument("--kv-mode", choices=["per_depth", "shared"], default="per_depth")
    p.add_argument("--depth-lora-rank", type=int, default=0,
                   help="rank of depth-wise LoRA adapters active from loop 2 on (0: none)")
    p.add_argument("--depth-lora-alpha", type=float, default=32.0, help="LoRA alpha of the depth-wise adapters")
    g = p.add_argument_group("--split auto: calibration")
    g.add_argument("--data", default=None,
                   help="data directory (default: $LOOPUS_DATA), or a .jsonl/.txt file that is the calibration text")
    g.add_argument("--calibration", default=None, help="calibration file (default: enwiki/valid.jsonl)")
    g.add_argument("--tokens", type=int, default=1024, help="calibration tokens (default 1024)")
    add_constraint_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..convert import convert
    from ..zoo import check_base_exists, load_base

    check_base_exists(args.base)  # a mistyped path is named first, before the other arguments
    if args.split is None and (args.encoder_layers is None or args.decoder_layers is None):
        raise ValueError("give --encoder-layers and --decoder-layers, or --split auto (or --split split.json)")
    if args.split is not None and (args.encoder_layers is not None or args.decoder_layers is not None):
        raise ValueError("give either --split or --encoder-layers/--decoder-layers, not both")
    base, tokenizer = load_base(args.base)
    options = dict(num_loops=args.num_loops, gate_rank=args.gate_rank, gate_init=args.gate_init, kv_mode=args.kv_mode,
                   depth_lora_rank=args.depth_lora_rank, depth_lora_alpha=args.depth_lora_alpha)
    if args.split is not None:
        model = convert(
            base,
            split=args.split,
            tokenizer=tokenizer,
            data=args.data,
            calibration=args.calibration,
            calibration_tokens=args.tokens,
            constraints=constraints_from(args),
            **options,
        )
    else:
        model = convert(base, args.encoder_layers, args.decoder_layers, **options)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    cfg = model.config
    if model.split_analysis is not None:
        from ..dynamics import choice_from_result, plot_dynamics

        analysis = model.split_analysis
        (Path(args.out) / "split.json").write_text(json.dumps(analysis, indent=2))
        plot_dynamics(analysis["metrics"], choice_from_result(analysis), Path(args.out) / "dynamics.png", args.base)
        for reason in analysis["reasons"]:
            print(f"  - {reason}")
    print(
        f"saved LoopUS model to {args.out}: encoder {cfg.encoder_layers} layers, reasoning layers "
        f"{cfg.reasoning_range.start}..{cfg.reasoning_range.stop - 1}, decoder {cfg.decoder_layers} layers"
    )
    return 0
