"""`loopus make-task depthchain --out DIR`: write a synthetic reasoning task's train/valid/test files.

    loopus make-task depthchain --out data/ --seed 0 --train-depths 1-8 --test-depths 1-16
    loopus eval RUN/model --data data/ --tasks depthchain --num-loops 1,2,4

Writes DIR/depthchain/{train,valid,test}.jsonl (TRL prompt/completion rows with a `depth` field) and
settings.json; the lm-eval tasks `depthchain` (every depth) and `depthchain_k1`..`depthchain_k16` read
them from the data directory (`--data DIR` or $LOOPUS_DATA).
"""

from __future__ import annotations

import argparse

HELP = "write a synthetic reasoning task (depthchain) as train/valid/test JSONL"


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
    p.add_argument("task", choices=["depthchain"], help="the task to write")
    p.add_argument("--out", required=True, help="data directory; the files go to OUT/depthchain/")
    p.add_argument("--seed", type=int, default=0, help="generation seed (same seed, same files)")
    p.add_argument("--train-depths", type=depth_range, default="1-8", help="depths of the train and valid items")
    p.add_argument("--test-depths", type=depth_range, default="1-16", help="depths of the test items")
    p.add_argument("--train-size", type=int, default=2000, help="train items per depth")
    p.add_argument("--valid-size", type=int, default=100, help="valid items per depth")
    p.add_argument("--test-size", type=int, default=200, help="test items per depth")
    p.add_argument("--distractors", type=int, default=3, help="distractor chains per item, as long as the asked one")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..tasks import write_depthchain

    files = write_depthchain(args.out, args.seed, args.train_depths, args.test_depths, args.train_size,
                             args.valid_size, args.test_size, args.distractors)
    for split, path in files.items():
        with open(path, encoding="utf-8") as f:
            print(f"{split}: {sum(1 for _ in f)} items -> {path}")
    return 0
