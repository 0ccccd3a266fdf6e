"""Offline datasets for the reasoning tasks (answer only, no chain of thought), read from the data
directory like the loaders in utils.py: ProntoQA (5 hops, Coconut protocol, and the 1-4 hop ladder),
ProsQA (validation split), GSM8K, multi-digit multiplication, and the generated `depthchain` task.

Closed answer sets become `multiple_choice` rows (`choices` + `label`); open ones carry the exact
`answer` string that a generation must match.
"""

from __future__ import annotations

import json
import re

import datasets

from loopus.eval.tasks.utils import _dataset, _file, _jsonl, _root


def _splits(kwargs: dict, files: dict[str, str], row) -> datasets.DatasetDict:
    """Split name -> relative file; the test split is required, the others are read when present."""
    out = {}
    for split, relative in files.items():
        if split == "test" or (_root(kwargs) / relative).exists():
            out[split] = _dataset([row(r, relative) for r in _read(_file(kwargs, relative))])
    return datasets.DatasetDict(out)


def _read(path) -> list:
    if path.suffix == ".jsonl":
        return _jsonl(path)
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- ProntoQA: "True or false: ..." over the facts; log-likelihood of " True" against " False" ----------


def _prontoqa_row(r: dict, source: str) -> dict:
    if r["answer"] not in ("True", "False"):
        raise ValueError(f"{source} {r['id']}: answer must be 'True' or 'False', got {r['answer']!r}")
    return {"id": r["id"], "hops": r["hops"], "question": r["question"], "query": r["query"],
            "label": 0 if r["answer"] == "True" else 1}


def load_prontoqa(hops: int = 5, **kwargs) -> datasets.DatasetDict:
    """prontoqa/{hops}hop_{train,valid,test}.jsonl (the official generator's JSON output)."""
    files = {s: f"prontoqa/{hops}hop_{name}.jsonl" for s, name in
             (("train", "train"), ("validation", "valid"), ("test", "test"))}
    return _splits(kwargs, files, _prontoqa_row)


# -- ProsQA: "Is NAME a X or Y?"; the two answer sentences in the question's order -------------------

PROSQA_QUESTION = re.compile(r"Is (?P<name>.+) a (?P<first>\S+) or (?P<second>\S+)\?$")


def _prosqa_row(r: dict, source: str) -> dict:
    match = PROSQA_QUESTION.search(r["question"])
    if match is None:
        raise ValueError(f"{source}: question does not end 'Is NAME a X or Y?': {r['question'][-80:]!r}")
    choices = [f"{match['name']} is a {match[k]}." for k in ("first", "second")]
    if r["answer"] not in choices:
        raise ValueError(f"{source}: answer {r['answer']!r} is neither of {choices}")
    return {"question": r["question"], "choices": choices, "label": choices.index(r["answer"]),
            "steps": len(r["steps"])}


def load_prosqa(**kwargs) -> datasets.DatasetDict:
    """prosqa/prosqa_valid.json (Coconut's validation split) as the validation split."""
    rows = [_prosqa_row(r, "prosqa/prosqa_valid.json") for r in _read(_file(kwargs, "prosqa/prosqa_valid.json"))]
    return datasets.DatasetDict({"validation": _dataset(rows)})


# -- GSM8K, answer only: the number after "####" ------------------------------------------------------


def _gsm8k_row(r: dict, source: str) -> dict:
    answer = r["answer"].rsplit("####", 1)
    if len(answer) != 2:
        raise ValueError(f"{source}: answer has no '#### N' line: {r['answer'][-60:]!r}")
    return {"question": r["question"], "answer": answer[1].strip().replace(",", "")}


def load_gsm8k_nocot(**kwargs) -> datasets.DatasetDict:
    return _splits(kwargs, {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}, _gsm8k_row)


# -- multiplication (Internalize-CoT digit format: spaced digits, least significant first) ------------

MULT_LINE = re.compile(r"^(?P<a>[0-9 ]+?) \* (?P<b>[0-9 ]+?)\|\|.*#### (?P<c>[0-9 ]+)$")


def _mult_row(line: str, source: str) -> dict:
    match = MULT_LINE.match(line.strip())
    if match is None:
        raise ValueError(f"{source}: not 'A * B||CHAIN #### C': {line[:60]!r}")
    return {"question": f"{match['a']} * {match['b']}", "answer": match["c"]}


def load_mult(size: int, **kwargs) -> datasets.DatasetDict:
    """multiplication/{N}x{N}_test_bigbench.txt (test) and _valid.txt (validation, the few-shot pool)."""
    files = {"validation": f"multiplication/{size}x{size}_valid.txt",
             "test": f"multiplication/{size}x{size}_test_bigbench.txt"}
    return _splits(kwargs, files, _mult_row)


# -- depthchain (written by `loopus make-task depthchain --out DIR`) ----------------------------------


def load_depthchain(depth: int | None = None, **kwargs) -> datasets.DatasetDict:
    """depthchain/test.jsonl, only the items at `depth` when given."""
    from loopus.tasks import DEPTHCHAIN_DIR

    root, relative = _root(kwargs), f"{DEPTHCHAIN_DIR}/test.jsonl"
    if not (root / relative).exists():
        raise FileNotFoundError(f"{relative} not found in the data directory {root}: write it with "
                                f"`loopus make-task depthchain --out {root}`")
    rows = _jsonl(root / relative)
    if depth is not None:
        rows = [r for r in rows if r["depth"] == depth]
        if not rows:
            raise ValueError(f"{relative} has no items at depth {depth}: write them with "
                             f"`loopus make-task depthchain --test-depths 1-{depth}`")
    keep = ("id", "prompt", "answer", "depth")
    return datasets.DatasetDict({"test": _dataset([{k: r[k] for k in keep} for r in rows])})
