"""Training files for the reasoning tasks: the prompts and completions are exactly what the lm-eval
tasks score, and generated multiplication pairs are correct, distinct and never a held-out pair."""

from __future__ import annotations

import json

import pytest

from loopus.cli import main
from loopus.eval import task_manager
from loopus.tasks.sft import mult_row, mult_rows, sft_splits


@pytest.fixture(scope="module")
def tm(data_dir):
    return task_manager(include_defaults=False, metadata={"data_dir": str(data_dir)})


def _scored(task, doc) -> tuple[str, str]:
    """(prompt, completion) the lm-eval task scores for `doc`: the context, and the delimiter + right answer."""
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        target = task.doc_to_choice(doc)[target]
    return task.doc_to_text(doc), task.config.target_delimiter + target


@pytest.mark.parametrize("name", ["prontoqa", "gsm8k_nocot"])
def test_training_rows_are_the_scored_prompts(tm, data_dir, name):
    task = tm.load([name])["tasks"][name]
    rows = sft_splits(name, data_dir)["train"]
    docs = list(task.training_docs())
    assert len(rows) == len(docs) > 1000
    for doc, row in zip(docs[:300], rows):
        assert _scored(task, doc) == (row["prompt"], row["completion"])


@pytest.mark.parametrize("size", [4, 5])
def test_multiplication_rows_match_the_test_format(tm, size):
    task = tm.load([f"mult_{size}x{size}"])["tasks"][f"mult_{size}x{size}"]
    for doc in list(task.eval_docs)[:200]:
        a, b = (int(x.replace(" ", "")[::-1]) for x in doc["question"].split(" * "))
        row = mult_row(a, b, size)
        assert _scored(task, doc) == (row["prompt"], row["completion"])


def test_generated_products_are_right_distinct_and_held_out(data_dir):
    held = {"1 0 0 1 * 1 0 0 1 ="}
    rows = mult_rows(4, 3000, seed=0, held_out=held)
    assert rows == mult_rows(4, 3000, seed=0, held_out=held) != mult_rows(4, 3000, seed=1, held_out=held)
    assert len({r["prompt"] for r in rows}) == 3000 and not held & {r["prompt"] for r in rows}
    for r in rows:
        a, b = (x.split(" ") for x in r["prompt"].removesuffix(" =").split(" * "))
        assert len(a) == len(b) == 4 and a[-1] != "0" and b[-1] != "0"  # four real digits each
        product = int("".join(a)[::-1]) * int("".join(b)[::-1])
        assert r["completion"] == " " + " ".join(str(product).zfill(8)[::-1])
    splits = sft_splits("mult_5x5", data_dir, count=2000)
    test_prompts = {line.split("||")[0].strip() + " =" for name in ("test_bigbench", "valid")
                    for line in (data_dir / "multiplication" / f"5x5_{name}.txt").read_text().splitlines()}
    assert len(splits["train"]) == 2000 and len(splits["valid"]) == 1000
    assert not test_prompts & {r["prompt"] for r in splits["train"] + splits["valid"]}


def test_make_task_writes_sft_files(data_dir, tmp_path, capsys):
    assert main(["make-task", "mult_4x4", "--out", str(tmp_path), "--data", str(data_dir), "--train-size", "50"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "sft" / "mult_4x4" / "train.jsonl").open()]
    assert len(rows) == 50 and set(rows[0]) == {"prompt", "completion"}
    assert "valid: 1000 items" in capsys.readouterr().out
    assert main(["make-task", "prontoqa", "--out", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "prontoqa/5hop_train.jsonl not found in the data directory" in capsys.readouterr().err
    assert main(["make-task", "mult_5x5", "--out", str(tmp_path), "--data", str(data_dir), "--train-size", "-3"]) == 2
    assert capsys.readouterr().err.strip() == "loopus make-task: error: the train size must be 0 or more, got -3"
