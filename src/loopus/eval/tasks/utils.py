"""Offline datasets for the shipped lm-eval tasks: read the loopus data directory, build the rows
lm-eval's own task configs expect (same field names as the hub datasets), return a `DatasetDict`.

Every loader is a `custom_dataset` for lm-eval (called with the task's metadata and dataset_kwargs).
The data directory is `$LOOPUS_DATA` (or a `data_dir` given in `--metadata`), see `loopus.paths`.
"""

from __future__ import annotations

import bz2
import csv
import json
from pathlib import Path

import datasets
from lm_eval.tasks.hellaswag.utils import preprocess as hellaswag_preprocess

# lm-eval's own wikitext and winogrande helpers, so prompts and metrics are exactly lm-eval's: the task
# YAMLs here name them `utils.<name>` (lm-eval resolves `!function` against this file).
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results as wikitext_process_results  # noqa: F401
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice as winogrande_doc_to_choice  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_target as winogrande_doc_to_target  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_text as winogrande_doc_to_text  # noqa: F401

from loopus.paths import data_dir, data_file


def _root(kwargs: dict) -> Path:
    return data_dir(kwargs.get("data_dir"))


def _file(kwargs: dict, relative: str) -> Path:
    """`relative` in the data directory; FileNotFoundError naming both if it is not there."""
    return data_file(relative, kwargs.get("data_dir"))


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows)


# -- wikitext (document level, as EleutherAI/wikitext_document_level builds it) -----------------------


def wikitext_pages(text: str) -> list[str]:
    """Split raw WikiText into articles at the top-level ` = Title = ` headings (lm-eval's document split)."""
    pages, lines = [], []
    for line in text.split("\n"):
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.strip().endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def load_wikitext(**kwargs) -> datasets.DatasetDict:
    text = _file(kwargs, "wikitext2/wiki.test.raw").read_text(encoding="utf-8")
    return datasets.DatasetDict({"test": _dataset([{"page": p} for p in wikitext_pages(text)])})


# -- lambada_openai ---------------------------------------------------------------------------------


def load_lambada_openai(**kwargs) -> datasets.DatasetDict:
    rows = _jsonl(_file(kwargs, "lambada_openai/lambada_test.jsonl"))
    return datasets.DatasetDict({"test": _dataset([{"text": r["text"]} for r in rows])})


# -- hellaswag (derived 6-lines-per-task text format, see the data directory's SOURCES.md) -----------


def load_hellaswag(**kwargs) -> datasets.DatasetDict:
    path = _file(kwargs, "hellaswag/hellaswag_val_full.txt.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    if len(lines) % 6:
        raise ValueError(f"{path}: expected 6 lines per task, got {len(lines)} lines")
    rows = []
    for i in range(0, len(lines), 6):
        context, label, *endings = lines[i : i + 6]
        rows.append(
            {
                # line 1 is `activity_label: ctx` (ctx_b not capitalised, unlike lm-eval's query)
                "query": hellaswag_preprocess(context),
                "choices": [hellaswag_preprocess(e) for e in endings],
                "label": int(label),
            }
        )
    return datasets.DatasetDict({"validation": _dataset(rows)})


# -- ARC (original AI2 jsonl -> the allenai/ai2_arc row layout) --------------------------------------


def _ai2_choices(question: dict) -> dict[str, list[str]]:
    """AI2's `question.choices` list (ARC, OpenBookQA) in the hub datasets' {"text": [...], "label": [...]} form."""
    return {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}


def _arc(kwargs: dict, name: str) -> datasets.DatasetDict:
    rows = []
    for r in _jsonl(_file(kwargs, f"arc/{name}-Test.jsonl")):
        q = r["question"]
        rows.append(
            {
                "id": r["id"],
                "question": q["stem"],
                "choices": _ai2_choices(q),
                "answerKey": r["answerKey"],
            }
        )
    return datasets.DatasetDict({"test": _dataset(rows)})


def load_arc_easy(**kwargs) -> datasets.DatasetDict:
    return _arc(kwargs, "ARC-Easy")


def load_arc_challenge(**kwargs) -> datasets.DatasetDict:
    return _arc(kwargs, "ARC-Challenge")


# -- PIQA (official valid.jsonl + valid-labels.lst) -----------------------------------------------------


def load_piqa(**kwargs) -> datasets.DatasetDict:
    rows = _jsonl(_file(kwargs, "piqa/valid.jsonl"))
    labels = _file(kwargs, "piqa/valid-labels.lst").read_text().split()
    if len(labels) != len(rows):
        raise ValueError(f"piqa: {len(rows)} questions but {len(labels)} labels")
    out = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)} for r, y in zip(rows, labels)]
    return datasets.DatasetDict({"validation": _dataset(out)})


# -- MMLU (original CSV release; dev = the few-shot split) ---------------------------------------------


def _mmlu_csv(path: Path, subject: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return [
            {"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(ans.strip())}
            for q, a, b, c, d, ans in csv.reader(f)
        ]


def load_mmlu(subject: str, **kwargs) -> datasets.DatasetDict:
    splits = {"test": "test", "dev": "dev", "validation": "val"}
    out = {}
    for split, folder in splits.items():
        relative = f"mmlu/{folder}/{subject}_{folder}.csv"
        if split == "test" or (_root(kwargs) / relative).exists():  # only the test split is required
            out[split] = _dataset(_mmlu_csv(_file(kwargs, relative), subject))
    return datasets.DatasetDict(out)


# -- WinoGrande (official release: dev.jsonl + dev-labels.lst) -----------------------------------------


def load_winogrande(**kwargs) -> datasets.DatasetDict:
    """`winogrande/dev.jsonl` (+ `dev-labels.lst` if present, which then decides the answer)."""
    rows = _jsonl(_file(kwargs, "winogrande/dev.jsonl"))
    labels_path = _root(kwargs) / "winogrande" / "dev-labels.lst"
    if labels_path.exists():
        labels = labels_path.read_text().split()
        if len(labels) != len(rows):
            raise ValueError(f"winogrande: {len(rows)} sentences but {len(labels)} labels in dev-labels.lst")
    else:
        labels = [str(r.get("answer", "")) for r in rows]
    out = []
    for r, y in zip(rows, labels):
        if y not in ("1", "2"):
            raise ValueError(f"winogrande: answer must be '1' or '2', got {y!r} for {r.get('qID')}")
        out.append({"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": y})
    return datasets.DatasetDict({"validation": _dataset(out)})


# -- OpenBookQA (official Main jsonl -> the allenai/openbookqa "main" row layout) ----------------------


def load_openbookqa(**kwargs) -> datasets.DatasetDict:
    out = {}
    for split, name in (("train", "train"), ("validation", "dev"), ("test", "test")):
        relative = f"openbookqa/{name}.jsonl"
        if split != "test" and not (_root(kwargs) / relative).exists():  # only the test split is required
            continue
        rows = []
        for r in _jsonl(_file(kwargs, relative)):
            q = r["question"]
            rows.append(
                {
                    "id": r["id"],
                    "question_stem": q["stem"],
                    "choices": _ai2_choices(q),
                    "answerKey": r["answerKey"],
                }
            )
        out[split] = _dataset(rows)
    return datasets.DatasetDict(out)
