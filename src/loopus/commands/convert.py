"""`loopus convert BASE (--encoder-layers N --decoder-layers N | --split auto|FILE|E,D) --out DIR`.

Also what every command that runs a model takes: `add_model_arguments` and `load_model` (a LoopUS
checkpoint, or a base model converted on the fly with a split).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checkpoint import check_model_path, is_loopus_checkpoint
from ..options import KV_MODES
from .analyze import add_calibration_arguments, add_constraint_arguments, constraints_from

HELP = "recast a pretrained causal LM as a LoopUS model"

SPLIT_HELP = ("'auto' (analyze the base model on calibration text from --data and choose), a split.json "
              "from `loopus analyze`, or E,D counts")


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


def add_split_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder-layers", type=parse_layers, default=None, help="count N, or indices 0,1,2 (default: none)")
    p.add_argument("--decoder-layers", type=parse_layers, default=None,
                   help="count N, or indices 15,16,17 (default: none)")
    p.add_argument("--split", type=parse_split, default=None,
                   help=f"instead of --encoder-layers/--decoder-layers: {SPLIT_HELP} (default: none)")


def split_arguments(args: argparse.Namespace) -> str | tuple | None:
    """The split (as `loopus.dynamics.resolve_split` takes it) from --split or --encoder-layers/--decoder-layers;
    None if none is given."""
    layers = (args.encoder_layers, args.decoder_layers)
    given = [value is not None for value in layers]
    if args.split is not None:
        if any(given):
            raise ValueError("give either --split or --encoder-layers/--decoder-layers, not both")
        return args.split
    if not any(given):
        return None
    if not all(given):
        raise ValueError("give both --encoder-layers and --decoder-layers, or --split auto (or --split split.json)")
    return layers


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL and how to convert it when it is a base model (see `load_model`)."""
    p.add_argument("model", help="LoopUS checkpoint directory, or a base model (embedded name such as "
                   "gemma-3-270m, checkpoint directory, hub id) with a split, converted on the fly")
    add_split_arguments(p)
    p.add_argument("--data", default=None, help="data directory for --split auto (default: $LOOPUS_DATA)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's own)")


def load_model(args: argparse.Namespace):
    """(LoopUS model in eval mode, tokenizer) from `add_model_arguments`' flags.

    A LoopUS checkpoint is loaded as it is; a base model is converted with the split given (its gate
    and confidence head then are untrained).
    """
    from transformers import AutoTokenizer

    from ..dynamics import convert_auto
    from ..modeling import LoopUSForCausalLM
    from ..zoo import load_base

    check_model_path(args.model)
    split = split_arguments(args)
    if is_loopus_checkpoint(args.model):
        if split is not None:
            raise ValueError(f"{args.model} is a LoopUS checkpoint with its own split: leave out "
                             "--split/--encoder-layers/--decoder-layers")
        model = LoopUSForCausalLM.from_pretrained(args.model)
        source = args.tokenizer or args.model
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"no tokenizer in {source}: pass --tokenizer DIR ({err})") from None
        return model.eval(), tokenizer
    if split is None:
        raise ValueError(
            f"{args.model} is not a LoopUS checkpoint: give a split for the base model "
            "(--split E,D, --split split.json, --split auto, or --encoder-layers/--decoder-layers)"
        )
    base, tokenizer = load_base(args.model)
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    return convert_auto(base, split, tokenizer, data=args.data).eval(), tokenizer


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..config import LoopUSConfig  # its defaults are shown in the help (only when this verb is built)

    defaults = LoopUSConfig()
    p = subparsers.add_parser("convert", help=HELP)
    p.add_argument("base", help="embedded name (gemma-3-270m), checkpoint directory or hub id")
    add_split_arguments(p)
    p.add_argument("--out", required=True, help="output directory (save_pretrained format)")
    p.add_argument("--num-loops", type=int, default=defaults.num_loops, help="default loop count stored in the config")
    p.add_argument("--gate-rank", type=int, default=defaults.gate_rank, help="bottleneck width of the selective gate")
    p.add_argument("--gate-init", type=float, default=defaults.gate_init,
                   help="gate share at init; %(default)s keeps every loop count near the base model (0.5: the paper's)")
    p.add_argument("--gate-floor", type=float, default=defaults.gate_floor,
                   help="smallest gate share, below --gate-init (default %(default)s: the gate can close fully)")
    p.add_argument("--input-injection", action="store_true",
                   help="feed the encoder output into every loop from loop 2 on (zero-initialised linear map)")
    p.add_argument("--kv-mode", choices=KV_MODES, default=defaults.kv_mode, help="KV cache layout stored in the config")
    p.add_argument("--depth-lora-rank", type=int, default=defaults.depth_lora_rank,
                   help="rank of depth-wise LoRA adapters active from loop 2 on (0: none)")
    p.add_argument("--depth-lora-alpha", type=float, default=defaults.depth_lora_alpha,
                   help="LoRA alpha of the depth-wise adapters (default %(default)s)")
    p.add_argument("--depth-lora-count", type=int, default=defaults.depth_lora_count,
                   help="distinct depth-wise adapters: 1 shares one across loops 2 on; k > 1 gives loops 2..k+1 "
                        "one each (default %(default)s)")
    add_calibration_arguments(p.add_argument_group("--split auto: calibration"))
    add_constraint_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..dynamics import convert_auto, plot_dynamics
    from ..split import choice_from_result
    from ..zoo import check_base_exists, load_base

    check_base_exists(args.base)  # a mistyped path is named first, before the other arguments
    split = split_arguments(args)
    if split is None:
        raise ValueError("give --encoder-layers and --decoder-layers, or --split auto (or --split split.json)")
    calibration = {}
    if args.split is not None:
        calibration = dict(data=args.data, calibration=args.calibration, calibration_tokens=args.tokens,
                           constraints=constraints_from(args))
    base, tokenizer = load_base(args.base)
    model = convert_auto(base, split, tokenizer, **calibration, num_loops=args.num_loops,
                         gate_rank=args.gate_rank, gate_init=args.gate_init, gate_floor=args.gate_floor,
                         input_injection=args.input_injection, kv_mode=args.kv_mode,
                         depth_lora_rank=args.depth_lora_rank, depth_lora_alpha=args.depth_lora_alpha,
                         depth_lora_count=args.depth_lora_count)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    cfg = model.config
    if model.split_analysis is not None:
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
