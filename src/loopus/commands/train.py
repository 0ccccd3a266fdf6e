"""`loopus train --model M --data D --out DIR [--recipe NAME] [flags | --config FILE]`: RDS post-training or a
dense baseline.

Precedence: flags, then `--config FILE` (YAML or JSON, keys as the long flag names, flat or nested by
sub-config), then `--recipe NAME` (default: `default`; `loopus.train.recipes`), then the defaults.
Multi-process: `accelerate launch -m loopus.cli train ...` (same flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..train.config import TrainConfig

HELP = "post-train a LoopUS model with random deep supervision (or a dense baseline)"


def option_fields() -> list[dataclasses.Field]:
    """Every option of `TrainConfig` with a flag of its own, in the order of the sub-configs."""
    from ..train.config import SECTIONS, top_fields

    fields = [f for section in SECTIONS.values() for f in dataclasses.fields(section)]
    return fields + [f for f in top_fields() if f.name != "resume"]


def shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..train.recipes import RECIPES

    p = subparsers.add_parser(
        "train",
        help=HELP,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="named recipe the options start from (loopus.train.recipes; default: default)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in --out")
    for f in option_fields():
        text = f.metadata["help"]
        if "default" not in text:
            text += f" (default: {shown(f.default) if f.default is not None else 'none'})"
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=f.metadata["parse"], default=None,
                       choices=f.metadata["choices"], help=text)
    p.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from ..train.config import TrainConfig

    values: dict = {}
    if args.config:
        values.update(TrainConfig.read_file(args.config))
    if args.recipe:
        values["recipe"] = args.recipe
    for f in option_fields():
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    if args.resume:
        values["resume"] = True
    for required in ("out",):
        if not values.get(required):
            raise ValueError(f"--{required} is required (as a flag or in --config)")
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    from ..train.trainer import Trainer

    trainer = Trainer(config_from_args(args))
    history = trainer.train()
    if trainer.is_main:
        summary = {k: {n: round(v["loss"], 4) for n, v in r.items()} for k, r in history.items() if k in ("before", "after")}
        print(json.dumps({"out": trainer.cfg.out, "steps": trainer.step, "tokens": trainer.tokens,
                          "valid_loss": summary, "tokens_per_s": round(history["throughput"]["tokens_per_s"], 1)}))
    return 0
