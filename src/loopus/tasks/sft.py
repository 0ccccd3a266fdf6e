"""Training files for the reasoning tasks, as TRL prompt/completion rows in exactly the prompt format
their lm-eval tasks score (src/loopus/eval/tasks/*.yaml), so that SFT and evaluation agree.

ProntoQA and GSM8K come from the train splits in the data directory (`prontoqa_ladder`: the train and
valid splits of the chosen hop counts, shuffled together, so that a run reading the file in order sees every
depth from its first step); multiplication training pairs are generated (the source's training files are not shipped), keeping out every pair of its test and
validation files. ProsQA ships no training split.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable

from ..paths import data_file
from .files import read_jsonl, write_splits

SFT_DIR = "sft"  # OUT/sft/<task>/{train,valid}.jsonl
SFT_TASKS = ("prontoqa", "prontoqa_ladder", "gsm8k_nocot", "mult_4x4", "mult_5x5")
LADDER_HOPS = tuple(range(1, 6))  # the hop counts of the data directory's ProntoQA files


def prontoqa_row(r: dict) -> dict:
    return {"prompt": f"{r['question']} {r['query']}\nAnswer:", "completion": f" {r['answer']}", "depth": r["hops"]}


def prontoqa_ladder(hops: Iterable[int], data: str | Path | None = None, seed: int = 0) -> dict[str, list[dict]]:
    """{split: rows} of ProntoQA's `hops`-hop train and valid files, each split shuffled across hops."""
    hops = sorted(set(hops))
    if not hops or not set(hops) <= set(LADDER_HOPS):
        raise ValueError(f"ProntoQA hops must be among {LADDER_HOPS[0]}-{LADDER_HOPS[-1]}, got {hops}")
    splits = {}
    for split in ("train", "valid"):
        rows = [prontoqa_row(r) for h in hops for r in read_jsonl(data_file(f"prontoqa/{h}hop_{split}.jsonl", data))]
        random.Random(f"prontoqa_ladder/{seed}/{split}").shuffle(rows)
        splits[split] = rows
    return splits


def gsm8k_row(r: dict) -> dict:
    answer = r["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
    return {"prompt": f"Question: {r['question']}\nAnswer:", "completion": f" {answer}"}


def digits(number: int, width: int) -> str:
    """Internalize-CoT's digit format: `width` digits, space-separated, least significant first."""
    return " ".join(str(number).zfill(width)[::-1])


def mult_row(a: int, b: int, size: int) -> dict:
    return {"prompt": f"{digits(a, size)} * {digits(b, size)} =", "completion": f" {digits(a * b, 2 * size)}"}


def _held_out_pairs(size: int, data: str | Path | None) -> set[str]:
    """The prompts of the test and validation files, which generated training pairs must avoid."""
    held = set()
    for name in ("test_bigbench", "valid"):
        path = data_file(f"multiplication/{size}x{size}_{name}.txt", data)
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                held.add(line.split("||", 1)[0].strip() + " =")
    return held


def mult_rows(size: int, count: int, seed: int, held_out: set[str]) -> list[dict]:
    """`count` distinct random `size` x `size` products (leading digit never 0), none in `held_out`."""
    if 2 * count > 81 * 100 ** (size - 1):
        raise ValueError(f"{count} distinct {size}x{size} products asked for: ask for fewer")
    rng = random.Random(f"mult/{seed}/{size}")
    rows, seen = [], set(held_out)
    while len(rows) < count:
        a, b = (rng.randrange(10 ** (size - 1), 10**size) for _ in range(2))
        row = mult_row(a, b, size)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def sft_splits(task: str, data: str | Path | None = None, seed: int = 0, count: int = 80_000,
               hops: Iterable[int] = (1, 2, 3)) -> dict[str, list[dict]]:
    """{split: rows} for `task`: ProntoQA's 5-hop train/valid, the ProntoQA ladder's `hops`, GSM8K's train,
    or `count` generated products (train) and 1000 more (valid)."""
    if count < 0:
        raise ValueError(f"the train size must be 0 or more, got {count}")
    if task == "prontoqa":
        return {split: [prontoqa_row(r) for r in read_jsonl(data_file(f"prontoqa/5hop_{split}.jsonl", data))]
                for split in ("train", "valid")}
    if task == "prontoqa_ladder":
        return prontoqa_ladder(hops, data, seed)
    if task == "gsm8k_nocot":
        return {"train": [gsm8k_row(r) for r in read_jsonl(data_file("gsm8k/train.jsonl", data))]}
    if task in ("mult_4x4", "mult_5x5"):
        n = int(task[-1])
        rows = mult_rows(n, count + 1000, seed, _held_out_pairs(n, data))
        return {"train": rows[:count], "valid": rows[count:]}
    raise ValueError(f"no training data for task {task!r}: choose one of {', '.join(SFT_TASKS)}")


def write_sft(out_dir: str | Path, task: str, data: str | Path | None = None, seed: int = 0,
              count: int = 80_000, hops: Iterable[int] = (1, 2, 3)) -> dict[str, Path]:
    """Write OUT/sft/<task>/<split>.jsonl; returns the files by split."""
    return write_splits(Path(out_dir) / SFT_DIR / task, sft_splits(task, data, seed, count, hops))
