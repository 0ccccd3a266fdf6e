"""Are two training runs bit-identical? Every tensor of their model.safetensors and every logged loss.

    python bench/compare_runs.py RUN_A RUN_B      # exit 0 when both are equal

Used to show that a refactor of the training side changes no behaviour (docs/RESULTS.md, "The
training-side redesign"): train the same arm with the code before and after, then compare the outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

LOSS_KEYS = ("lm", "conf", "mono", "grad_norm")


def losses(run: Path) -> list[dict[str, float]]:
    """The loss and gradient-norm figures of every optimiser step in `run`'s logs/train.jsonl."""
    records = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith(LOSS_KEYS) or k == "step"} for r in records if "lm" in r]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    args = p.parse_args(argv)
    a, b = load_file(args.run_a / "model.safetensors"), load_file(args.run_b / "model.safetensors")
    if set(a) != set(b):
        print(f"different tensor names: {sorted(set(a) ^ set(b))[:5]}")
        return 1
    differing = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not a[k].equal(b[k])]
    steps_a, steps_b = losses(args.run_a), losses(args.run_b)
    print(f"tensors: {len(a)}, differing: {len(differing)} {differing[:5]}")
    print(f"loss records: {len(steps_a)} vs {len(steps_b)}, equal: {steps_a == steps_b}")
    return 0 if not differing and steps_a == steps_b else 1


if __name__ == "__main__":
    sys.exit(main())
