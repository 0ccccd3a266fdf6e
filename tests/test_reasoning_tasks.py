"""The reasoning tasks: offline loaders read the data directory and build the answer-only prompts, and
every label they carry is checked against the data's own ground truth."""

from __future__ import annotations

import pytest

from loopus.eval import SHIPPED_TASKS, task_manager
from loopus.eval.tasks.reasoning import load_gsm8k_nocot, load_mult, load_prontoqa, load_prosqa


@pytest.fixture(scope="module")
def tm(data_dir):
    """The shipped tasks with the data directory handed over as task metadata (as `loopus eval --data` does)."""
    return task_manager(include_defaults=False, metadata={"data_dir": str(data_dir)})


EXPECTED = {  # task: (eval docs, end of the first prompt, first target, choices or None)
    "prontoqa": (800, "Stella is a zumpus. True or false: Stella is not floral.\nAnswer:", 1, ["True", "False"]),
    "prontoqa_1hop": (400, None, None, ["True", "False"]),
    "prontoqa_2hop": (400, "Sam is a shumpus. True or false: Sam is large.\nAnswer:", 1, ["True", "False"]),
    "prontoqa_3hop": (400, None, None, ["True", "False"]),
    "prontoqa_4hop": (400, None, None, ["True", "False"]),
    "prosqa": (300, "Every rempus is a rorpus. Is Tom a lempus or scrompus?\nAnswer:", 0,
               ["Tom is a lempus.", "Tom is a scrompus."]),
    "gsm8k_nocot": (1319, "How much in dollars does she make every day at the farmers' market?\nAnswer:", "18", None),
    "mult_4x4": (1000, "7 6 9 2 * 1 6 3 6 =", "7 8 0 3 7 8 8 1", None),
    "mult_5x5": (1000, "9 4 0 8 3 * 1 4 2 0 1 =", "9 0 8 9 5 6 9 8 3 0", None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reasoning_task_reads_the_data_dir(tm, name):
    task = tm.load([name])["tasks"][name]
    docs = list(task.eval_docs)
    count, prompt_end, target, choices = EXPECTED[name]
    assert len(docs) == count
    if prompt_end is not None:
        assert task.doc_to_text(docs[0]).endswith(prompt_end)
        assert task.doc_to_target(docs[0]) == target
    if choices is None:
        assert task.OUTPUT_TYPE == "generate_until"
        until = task.config.generation_kwargs["until"]
        assert "\n" in until and task.config.generation_kwargs["max_gen_toks"] <= 24
    else:
        assert task.OUTPUT_TYPE == "multiple_choice" and task.doc_to_choice(docs[0]) == choices


def test_prontoqa_ladder_reports_every_depth(tm):
    loaded = tm.load(["prontoqa_ladder"])
    assert sorted(loaded["tasks"]) == sorted(["prontoqa", *(f"prontoqa_{h}hop" for h in range(1, 5))])
    for name, task in loaded["tasks"].items():
        hops = 5 if name == "prontoqa" else int(name[len("prontoqa_")])
        assert {d["hops"] for d in task.eval_docs} == {hops}


def test_every_reasoning_task_is_registered(tm):
    names = [*EXPECTED, "prontoqa_ladder", "depthchain", *(f"depthchain_k{k}" for k in range(1, 17))]
    assert set(names) <= set(SHIPPED_TASKS)
    assert set(names) <= set(tm.all_tasks)


def test_prontoqa_labels_follow_the_answers(data_dir):
    import json

    for hops in (1, 5):
        ds = load_prontoqa(hops, data_dir=str(data_dir))
        assert {s: len(ds[s]) for s in ds} == ({"train": 9000, "validation": 200, "test": 800} if hops == 5 else
                                               {"train": 1500, "validation": 100, "test": 400})
        raw = [json.loads(line) for line in (data_dir / "prontoqa" / f"{hops}hop_test.jsonl").open()]
        assert ds["test"]["label"] == [["True", "False"].index(r["answer"]) for r in raw]
        assert 0.4 < sum(ds["test"]["label"]) / len(raw) < 0.6  # balanced, as the data notes say


def test_prosqa_choices_contain_the_answer(data_dir):
    import json

    ds = load_prosqa(data_dir=str(data_dir))["validation"]
    raw = json.loads((data_dir / "prosqa" / "prosqa_valid.json").read_text())
    assert len(ds) == len(raw) == 300
    for row, r in zip(ds, raw):
        symbols = r["idx_to_symbol"]
        name = symbols[r["root"]]
        assert row["choices"][row["label"]] == r["answer"] == f"{name} is a {symbols[r['target']]}."
        assert f"{name} is a {symbols[r['neg_target']]}." == row["choices"][1 - row["label"]]
    assert 0 < sum(ds["label"]) < len(ds)  # the answer is not always first


def test_gsm8k_answer_is_the_final_number(data_dir):
    ds = load_gsm8k_nocot(data_dir=str(data_dir))
    assert len(ds["train"]) == 7473 and len(ds["test"]) == 1319
    assert all(a.lstrip("-").replace(".", "", 1).isdigit() for a in ds["test"]["answer"])


@pytest.mark.parametrize("size", [4, 5])
def test_multiplication_labels_are_the_products(data_dir, size):
    """Digits are least significant first: reversed, A * B == C for every row."""
    ds = load_mult(size, data_dir=str(data_dir))
    assert len(ds["test"]) == len(ds["validation"]) == 1000
    for row in [*ds["test"], *ds["validation"]]:
        a, b = (int(x.replace(" ", "")[::-1]) for x in row["question"].split(" * "))
        digits = row["answer"].split(" ")
        assert len(digits) == 2 * size and int("".join(digits)[::-1]) == a * b


def test_malformed_rows_are_named(tmp_path):
    (tmp_path / "multiplication").mkdir()
    (tmp_path / "multiplication" / "4x4_test_bigbench.txt").write_text("1 2 3 4 * 5 6 7 8 #### 5\n")
    with pytest.raises(ValueError, match="not 'A \\* B\\|\\|CHAIN #### C'"):
        load_mult(4, data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="prosqa/prosqa_valid.json"):
        load_prosqa(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="prontoqa/3hop_test.jsonl"):
        load_prontoqa(3, data_dir=str(tmp_path))
