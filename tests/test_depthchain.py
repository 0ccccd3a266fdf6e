"""The generated depth-bound task: deterministic from its seed, every label and depth confirmed by a
solver written here (independent of the generator), and no single line of the chain predicts the answer."""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict

import pytest

from loopus.cli import main
from loopus.eval import task_manager
from loopus.tasks import make_item, write_depthchain

CONSTANT = re.compile(r"^(\w+) = (\d+)$")
STEP = re.compile(r"^(\w+) = (\w+) \+ (\d+)$")


def solve(prompt: str) -> dict:
    """Read the assignments back from the prompt text and evaluate them: value and depth of every variable."""
    lines = prompt.split("\n")
    assert lines[0] == "Each line sets one variable. Arithmetic is modulo 10." and lines[-1] == "Answer:"
    query = re.fullmatch(r"What is (\w+)\?", lines[-2]).group(1)
    defs = {}
    for line in lines[1:-2]:
        if m := CONSTANT.match(line):
            var, rhs = m[1], (None, int(m[2]))
        else:
            m = STEP.match(line)
            assert m, f"unexpected line {line!r}"
            var, rhs = m[1], (m[2], int(m[3]))
        assert var not in defs, f"{var} set twice"
        defs[var] = rhs

    memo: dict[str, tuple[int, int]] = {}

    def value(var: str, seen: frozenset = frozenset()) -> tuple[int, int]:
        assert var in defs and var not in seen, f"{var} undefined or cyclic"
        if var not in memo:
            parent, number = defs[var]
            if parent is None:
                memo[var] = (number % 10, 0)
            else:
                v, d = value(parent, seen | {var})
                memo[var] = ((v + number) % 10, d + 1)
        return memo[var]

    referenced = {parent for parent, _ in defs.values() if parent is not None}
    ends = [v for v in defs if v not in referenced]
    root = query
    while defs[root][0] is not None:
        root = defs[root][0]
    return {"answer": value(query)[0], "depth": value(query)[1], "query": query, "lines": lines[1:-2],
            "end_depths": [value(v)[1] for v in ends], "query_step": defs[query][1], "root_value": defs[root][1]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("depthchain")
    write_depthchain(root, seed=7, train_depths=range(1, 9), test_depths=range(1, 17), train_size=300,
                     valid_size=20, test_size=150)
    return {s: [json.loads(x) for x in (root / "depthchain" / f"{s}.jsonl").open()] for s in ("train", "valid", "test")}


def test_every_label_and_depth_is_confirmed_by_the_solver(files):
    for split, rows in files.items():
        for row in rows:
            solved = solve(row["prompt"])
            assert row["completion"] == f" {solved['answer']}" and row["answer"] == str(solved["answer"])
            assert solved["depth"] == row["depth"] and solved["query"] == row["query"]
            # the asked chain and every distractor chain end at the same depth
            assert solved["end_depths"] == [row["depth"]] * (row["distractors"] + 1)
            assert len(solved["lines"]) == (row["depth"] + 1) * (row["distractors"] + 1)


def test_splits_cover_their_depths_and_never_share_an_item(files):
    assert Counter(r["depth"] for r in files["test"]) == {k: 150 for k in range(1, 17)}
    assert Counter(r["depth"] for r in files["train"]) == {k: 300 for k in range(1, 9)}
    test_prompts = {r["prompt"] for r in files["test"]}
    assert len(test_prompts) == len(files["test"])
    assert not test_prompts & {r["prompt"] for r in files["train"] + files["valid"]}
    answers = Counter(r["answer"] for r in files["test"])
    assert set(answers) == set("0123456789")  # every digit occurs


def test_generation_is_deterministic_from_the_seed(tmp_path):
    def write(folder, seed, train_size=5):
        write_depthchain(tmp_path / folder, seed=seed, train_depths=[1, 2], test_depths=[1, 3], train_size=train_size,
                         valid_size=2, test_size=4)
        return {s: (tmp_path / folder / "depthchain" / f"{s}.jsonl").read_bytes() for s in ("train", "valid", "test")}

    first, again, other = write("a", 3), write("b", 3), write("c", 4)
    assert first == again
    assert all(first[s] != other[s] for s in first)
    # each split draws from its own stream: a larger train split leaves valid and test as they were
    bigger = write("d", 3, train_size=9)
    assert bigger["test"] == first["test"] and bigger["valid"] == first["valid"]
    assert set(first["train"].splitlines()) < set(bigger["train"].splitlines())
    settings = json.loads((tmp_path / "a" / "depthchain" / "settings.json").read_text())
    assert settings["seed"] == 3 and settings["test_depths"] == [1, 3]


def _features(row: dict) -> dict:
    """What a model that answers from one line sees."""
    solved = solve(row["prompt"])
    last_line = solved["lines"][-1]
    return {
        "last line of the chain": solved["query_step"],  # the query's own line: its step
        "root of the chain": solved["root_value"],
        "last line of the prompt": last_line.rsplit(" ", 1)[-1],
        "query name": solved["query"],
        "always the same answer": 0,
    }


def test_single_line_models_score_at_chance(files):
    """Fit, on the train split, the best answer for each value of a one-line feature (a model trained to
    answer from that line); on the test split it scores at chance (1/10), at every depth pooled and at depth 1."""
    table: dict[str, dict] = defaultdict(lambda: defaultdict(Counter))
    for row in files["train"]:
        for name, value in _features(row).items():
            table[name][value][row["answer"]] += 1
    test = files["test"]
    sigma = (0.1 * 0.9 / len(test)) ** 0.5
    for name in table:
        hits = sum(
            (table[name][_features(r)[name]].most_common(1) or [("?", 0)])[0][0] == r["answer"] for r in test
        )
        assert abs(hits / len(test) - 0.1) < 4 * sigma, f"{name}: {hits}/{len(test)}"
    # and the solver (all lines) is always right: the chain, not the line, carries the answer
    assert all(str(solve(r["prompt"])["answer"]) == r["answer"] for r in test)


def test_depth_tasks_read_the_generated_files(tmp_path, monkeypatch):
    write_depthchain(tmp_path, seed=1, train_depths=[1], test_depths=range(1, 17), train_size=2, valid_size=1,
                     test_size=3, distractors=1)
    monkeypatch.setenv("LOOPUS_DATA", str(tmp_path))
    loaded = task_manager(include_defaults=False).load(["depthchain"])
    assert sorted(loaded["tasks"]) == sorted(f"depthchain_k{k}" for k in range(1, 17))
    task = loaded["tasks"]["depthchain_k5"]
    docs = list(task.eval_docs)
    assert len(docs) == 3 and {d["depth"] for d in docs} == {5}
    assert task.doc_to_text(docs[0]).endswith("?\nAnswer:") and task.doc_to_target(docs[0]) == docs[0]["answer"]


def test_bad_settings_are_refused(tmp_path, monkeypatch):
    from loopus.eval.tasks.reasoning import load_depthchain

    rng = random.Random(0)
    with pytest.raises(ValueError, match="depth must be at least 1"):
        make_item(rng, 0, 3)
    with pytest.raises(ValueError, match="at most 676 exist"):
        make_item(rng, 200, 3)
    with pytest.raises(ValueError, match="train_size must be 0 or more"):
        write_depthchain(tmp_path, train_size=-1)
    with pytest.raises(FileNotFoundError, match="loopus make-task depthchain --out"):
        load_depthchain(3, data_dir=str(tmp_path))
    write_depthchain(tmp_path, train_depths=[1], test_depths=[1, 2], train_size=1, valid_size=1, test_size=1)
    with pytest.raises(ValueError, match="no items at depth 9"):
        load_depthchain(9, data_dir=str(tmp_path))


def test_make_task_cli(tmp_path, capsys):
    code = main(["make-task", "depthchain", "--out", str(tmp_path), "--seed", "2", "--train-depths", "1-2,4",
                 "--test-depths", "1-3", "--train-size", "2", "--valid-size", "1", "--test-size", "2",
                 "--distractors", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"test: 6 items -> {tmp_path / 'depthchain' / 'test.jsonl'}" in out and "train: 6 items" in out
    rows = [json.loads(x) for x in (tmp_path / "depthchain" / "train.jsonl").open()]
    assert sorted({r["depth"] for r in rows}) == [1, 2, 4] and {r["distractors"] for r in rows} == {1}
    assert set(rows[0]) >= {"prompt", "completion", "depth"}
    with pytest.raises(SystemExit):
        main(["make-task", "depthchain", "--out", str(tmp_path), "--test-depths", "0-3"])
    assert "depths are whole numbers from 1 up" in capsys.readouterr().err
    assert main(["make-task", "depthchain", "--out", str(tmp_path), "--distractors", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "loopus make-task: error: distractors must be 0 or more, got -1"


def test_make_task_builds_without_torch_and_documents_every_flag():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, types; sys.orig_argv[1:] = ['-m', 'loopus.cli']\n"
        "for heavy in ('loopus.commands.run', 'loopus.commands.train'):  # they import torch themselves\n"
        "    sys.modules[heavy] = types.SimpleNamespace(HELP='stub')\n"
        "from loopus.cli import build_parser\n"
        "parser = build_parser(['make-task'])\n"
        "sub = parser._subparsers._group_actions[0].choices['make-task']\n"
        "assert all(a.help for a in sub._actions), 'a flag without help'\n"
        "from loopus.commands.make_task import run\n"
        "print(sorted(m for m in ('torch', 'transformers', 'lm_eval', 'datasets') if m in sys.modules))\n"
    )
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "PATH": ""}
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip() == "[]"


def test_training_and_validation_examples_are_shuffled_across_depths(tmp_path):
    # `loopus train` reads SFT examples, and its validation budget, in file order: the first examples of
    # either split must cover every training depth
    files = write_depthchain(tmp_path, seed=0, train_depths=range(1, 5), test_depths=[1], train_size=100,
                             valid_size=100, test_size=1)
    for split in ("train", "valid"):
        first = [json.loads(line)["depth"] for line in files[split].read_text().splitlines()[:40]]
        assert set(first) == {1, 2, 3, 4}, split


COPY = re.compile(r"^(\w+) = (\w+)$")
COPY_HEAD = "Each assignment sets one variable: "


def solve_copy(prompt: str) -> dict:
    """The copy task read back from its text: the asked chain's root digit, its depth, and every root."""
    lines = prompt.split("\n")
    assert len(lines) == 3 and lines[0].startswith(COPY_HEAD) and lines[0].endswith(".") and lines[-1] == "Answer:"
    query = re.fullmatch(r"What is (\w+)\?", lines[1]).group(1)
    assignments = lines[0][len(COPY_HEAD) : -1].split(", ")
    defs = dict(COPY.match(a).groups() for a in assignments)
    assert len(defs) == len(assignments), "a variable set twice"
    var, depth = query, 0
    while not defs[var].isdigit():
        var, depth = defs[var], depth + 1
        assert depth <= len(defs), "cyclic"
    roots = [rhs for rhs in defs.values() if rhs.isdigit()]
    return {"answer": defs[var], "depth": depth, "roots": roots, "lines": assignments}


def test_copy_chains_are_pointer_chasing_among_distinct_roots(tmp_path):
    write_depthchain(tmp_path, seed=5, train_depths=range(1, 5), test_depths=range(1, 17), train_size=200,
                     valid_size=10, test_size=100, operation="copy")
    rows = {s: [json.loads(x) for x in (tmp_path / "depthchain" / f"{s}.jsonl").open()]
            for s in ("train", "valid", "test")}
    for split in rows.values():
        for row in split:
            solved = solve_copy(row["prompt"])
            assert row["completion"] == f" {solved['answer']}" and solved["depth"] == row["depth"]
            assert len(set(solved["roots"])) == len(solved["roots"]) == row["distractors"] + 1
            assert len(solved["lines"]) == (row["depth"] + 1) * (row["distractors"] + 1)
            assert row["operation"] == "copy"
    test = rows["test"]
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in rows["train"] + rows["valid"]}
    # a model that answers with some root, chosen by where its line sits, scores at chance 1/(distractors + 1)
    chance = 1 / (test[0]["distractors"] + 1)
    sigma = (chance * (1 - chance) / len(test)) ** 0.5
    for pick in (0, -1):
        hits = sum(solve_copy(r["prompt"])["roots"][pick] == r["answer"] for r in test)
        assert abs(hits / len(test) - chance) < 4 * sigma, (pick, hits)
    settings = json.loads((tmp_path / "depthchain" / "settings.json").read_text())
    assert settings["operation"] == "copy"


def test_copy_operation_from_the_cli_and_its_limits(tmp_path, capsys):
    assert main(["make-task", "depthchain", "--out", str(tmp_path), "--operation", "copy", "--train-depths", "1-2",
                 "--test-depths", "1-3", "--train-size", "3", "--valid-size", "1", "--test-size", "2"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "depthchain" / "test.jsonl").open()]
    assert {r["operation"] for r in rows} == {"copy"} and all(solve_copy(r["prompt"]) for r in rows)
    capsys.readouterr()
    assert main(["make-task", "depthchain", "--out", str(tmp_path), "--operation", "copy", "--distractors", "10"]) == 2
    assert "copy chains need distinct root digits: at most 9 distractors, got 10" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown operation 'mul'"):
        make_item(random.Random(0), 2, 1, "mul")
