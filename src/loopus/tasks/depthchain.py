"""`depthchain`: a depth-bound task whose depth knob k is the number of sequentially dependent steps.

Each item lists variable assignments in shuffled order. The queried variable sits at the end of a chain

    v0 = c          v1 = v0 + d1        ...        vk = v(k-1) + dk        (all arithmetic modulo 10)

so its value needs k dependent lookups-and-adds from the one constant. Distractor chains of the same
length, with their own constants and names, share the prompt. The root constant is uniform on 0..9 and
independent of everything else in the item, so the answer is uniform given any proper subset of the
chain's lines: no single line (the query's own line, the last line, the root) predicts it better than
chance (1/10), and a model has to follow the whole chain. The answer is one digit.

With `operation="copy"` every step is a plain copy (`vk = v(k-1)`) and the chains' roots hold distinct
digits, so the answer is the root of the asked chain: pointer chasing, k lookups with no arithmetic, and
a model that has learned only "answer with some root" is right with chance 1/(distractors + 1). Its
assignments share one line, comma-separated, so that a name is the same token wherever it stands (a
SentencePiece tokenizer spells a word at the start of a line without the space it has after one, and
a lookup would first have to learn that the two tokens name one variable).

Generation is deterministic from the seed: each (split, depth) draws from its own `random.Random`
stream (string seeds are hashed with SHA-512, stable across Python versions), so changing one split's
size leaves every other split unchanged. Test items never appear in train or valid. The train and valid
splits are shuffled across depths, since a run reads examples (and its validation budget) in file order.
"""

from __future__ import annotations

import json
import random
import string
from itertools import product
from pathlib import Path
from typing import Iterable

from .files import write_splits

TASK_DIR = "depthchain"  # the folder inside the data directory that the lm-eval tasks read
MODULUS = 10
NAMES = tuple("".join(p) for p in product(string.ascii_lowercase, repeat=2))
OPERATIONS = ("add", "copy")
INSTRUCTIONS = {"add": f"Each line sets one variable. Arithmetic is modulo {MODULUS}.",
                "copy": "Each assignment sets one variable:"}


def make_item(rng: random.Random, depth: int, distractors: int, operation: str = "add") -> dict:
    """One item at `depth` (k >= 1 dependent steps) with `distractors` further chains of the same length."""
    if operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}: choose one of {', '.join(OPERATIONS)}")
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    if distractors < 0:
        raise ValueError(f"distractors must be 0 or more, got {distractors}")
    chains = distractors + 1
    if chains * (depth + 1) > len(NAMES):
        raise ValueError(f"{chains} chains of depth {depth} need {chains * (depth + 1)} variable names; "
                         f"at most {len(NAMES)} exist: lower the depth or the number of distractors")
    if operation == "copy" and chains > MODULUS:
        raise ValueError(f"copy chains need distinct root digits: at most {MODULUS - 1} distractors, got {distractors}")
    names = rng.sample(NAMES, chains * (depth + 1))
    roots = rng.sample(range(MODULUS), chains) if operation == "copy" else None
    lines, ends = [], []
    for c in range(chains):
        chain = names[c * (depth + 1) : (c + 1) * (depth + 1)]
        value = roots[c] if roots else rng.randrange(MODULUS)
        lines.append(f"{chain[0]} = {value}")
        for prev, var in zip(chain, chain[1:]):
            if roots:
                lines.append(f"{var} = {prev}")
                continue
            step = rng.randrange(1, MODULUS)  # never 0: every step changes the value
            lines.append(f"{var} = {prev} + {step}")
            value = (value + step) % MODULUS
        ends.append((chain[-1], value))
    query, answer = ends[0]  # chain 0 is the asked one; the shuffle hides which lines are its
    rng.shuffle(lines)
    if roots:  # one line, so that every name follows a space and is the same token wherever it stands
        prompt = "\n".join([f"{INSTRUCTIONS[operation]} {', '.join(lines)}.", f"What is {query}?", "Answer:"])
    else:
        prompt = "\n".join([INSTRUCTIONS[operation], *lines, f"What is {query}?", "Answer:"])
    return {"prompt": prompt, "completion": f" {answer}", "answer": str(answer), "depth": depth,
            "distractors": distractors, "operation": operation, "query": query}


def _items(seed: int, split: str, depths: Iterable[int], count: int, distractors: int, operation: str,
           exclude: set[str]) -> list[dict]:
    """`count` items per depth for `split`, none of whose prompts is in `exclude` (which grows)."""
    rows = []
    for depth in depths:
        stream = f"{seed}/{split}/{depth}" if operation == "add" else f"{operation}/{seed}/{split}/{depth}"
        rng = random.Random(f"depthchain/{stream}")  # the add task's streams predate the copy task
        made = tries = 0
        while made < count:
            tries += 1
            if tries > 10 * count + 100:
                raise ValueError(f"depth {depth}: too few distinct items for {count} per split: add distractors")
            item = make_item(rng, depth, distractors, operation)
            if item["prompt"] in exclude:
                continue
            exclude.add(item["prompt"])
            rows.append({"id": f"{split}-k{depth:02d}-{made:05d}", **item})
            made += 1
    return rows


def write_depthchain(
    out_dir: str | Path,
    seed: int = 0,
    train_depths: Iterable[int] = range(1, 9),
    test_depths: Iterable[int] = range(1, 17),
    train_size: int = 2000,
    valid_size: int = 100,
    test_size: int = 200,
    distractors: int = 3,
    operation: str = "add",
) -> dict[str, Path]:
    """Write `out_dir/depthchain/{train,valid,test}.jsonl` (TRL prompt/completion rows plus `depth`).

    Sizes are per depth. Train and valid cover `train_depths`, test covers `test_depths` (train on
    k <= K, test beyond K to measure extrapolation); `operation` is "add" (modular sums) or "copy"
    (pointer chasing). Returns the written files by split.
    """
    train_depths, test_depths = sorted(set(train_depths)), sorted(set(test_depths))
    for name, count in (("train_size", train_size), ("valid_size", valid_size), ("test_size", test_size)):
        if count < 0:
            raise ValueError(f"{name} must be 0 or more, got {count}")
    if not test_depths or test_size < 1:
        raise ValueError("the test split needs at least one depth and test_size >= 1")
    seen: set[str] = set()  # (an unknown operation is refused by the first `make_item`, before any file is written)
    splits = {split: _items(seed, split, depths, count, distractors, operation, seen)
              for split, depths, count in (("test", test_depths, test_size), ("valid", train_depths, valid_size),
                                           ("train", train_depths, train_size))}
    # training and its validation read examples in file order, so a short run (or a validation budget
    # smaller than the file) must not see only the first depth
    for split in ("train", "valid"):
        random.Random(f"depthchain/{seed}/{split}/order").shuffle(splits[split])
    folder = Path(out_dir) / TASK_DIR
    files = write_splits(folder, splits)
    settings = {"seed": seed, "train_depths": train_depths, "test_depths": test_depths, "train_size": train_size,
                "valid_size": valid_size, "test_size": test_size, "distractors": distractors,
                "operation": operation}
    (folder / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    return files
