"""`loopus make-task TASK --out DIR`: write a reasoning task's files as TRL prompt/completion JSONL.

    loopus make-task depthchain --out data/ --seed 0 --train-depths 1-8 --test-depths 1-16
    loopus make-task depthchain --out data/ --operation copy --train-depths 1-4   # pointer chasing
    loopus eval RUN/model --data data/ --tasks depthchain_k1,depthchain_k16 --num-loops 1,2,4
    loopus make-task mult_4x4 --out data/ --train-size 80000     # generated, test pairs kept out
    loopus make-task prontoqa --out data/                        # the data directory's train split
    loopus make-task prontoqa_ladder --out data/ --train-hops 1-3  # 1-3 hops mixed; test on prontoqa_4hop, 5

`depthchain` writes DIR/depthchain/{train,valid,test}.jsonl (with a `depth` field) and settings.json;
its lm-eval tasks (`depthchain`, `depthchain_k1`..`depthchain_k16`) read them from the data directory.
The others write the training files of the shipped reasoning tasks, in the prompts those tasks score,
to DIR/sft/TASK/{train,valid}.jsonl.
"""

from __future__ import annotations

import argparse

from ..tasks.depthchain import OPERATIONS

HELP = "write a reasoning task's train/valid(/test) files (depthchain, or SFT data for the shipped tasks)"
TASKS = ("depthchain", "prontoqa", "prontoqa_ladder", "gsm8k_nocot", "mult_4x4", "mult_5x5")


def depth_range(text: str) -> list[int]:
    """`1-8`, `3` or `1,2,5-7` as a sorted list of depths."""
    depths: set[int] = set()
    try:
        for part in (p for p in text.split(",") if p):
            low, _, high = part.partition("-")
            depths.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a depth range: write e.g. 1-8 or 1,2,5-7") from None
    if not depths or min(depths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: depths are whole numbers from 1 up, e.g. 1-8")
    return sorted(depths)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("make-task", help=HELP)
    p.add_argument("task", choices=TASKS, help="the task to write")
    p.add_argument("--out", required=True, help="output directory (DIR/depthchain/ or DIR/sft/TASK/)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (same seed, same files)")
    p.add_argument("--data", default=None, help="data directory to read train splits and held-out pairs from "
                   "(default: $LOOPUS_DATA; not used by depthchain)")
    p.add_argument("--train-size", type=int, default=None,
                   help="train items: per depth for depthchain (default 2000), products for mult_* (default 80000)")
    p.add_argument("--train-depths", type=depth_range, default="1-8", help="depthchain: depths of train and valid")
    p.add_argument("--test-depths", type=depth_range, default="1-16", help="depthchain: depths of the test items")
    p.add_argument("--train-hops", type=depth_range, default="1-3", help="prontoqa_ladder: hop counts of train and "
                   "valid, shuffled together (the data directory has 1-5)")
    p.add_argument("--valid-size", type=int, default=100, help="depthchain: valid items per depth")
    p.add_argument("--test-size", type=int, default=200, help="depthchain: test items per depth")
    p.add_argument("--distractors", type=int, default=3, help="depthchain: distractor chains per item, as long as "
                   "the asked one")
    p.add_argument("--operation", choices=OPERATIONS, default="add",
                   help="depthchain: each step adds a digit modulo 10 (add) or copies the previous variable "
                        "(copy: pointer chasing, the easier task)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.task == "depthchain":
        from ..tasks import write_depthchain

        files = write_depthchain(args.out, args.seed, args.train_depths, args.test_depths,
                                 2000 if args.train_size is None else args.train_size, args.valid_size,
                                 args.test_size, args.distractors, args.operation)
    else:
        from ..tasks.sft import write_sft

        files = write_sft(args.out, args.task, args.data, args.seed,
                          80_000 if args.train_size is None else args.train_size, args.train_hops)
    for split, path in files.items():
        with open(path, encoding="utf-8") as f:
            print(f"{split}: {sum(1 for _ in f)} items -> {path}")
    return 0
