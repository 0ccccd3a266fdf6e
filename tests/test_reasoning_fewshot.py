"""Few-shot prompts through lm-eval's own mechanism (`--num_fewshot N`), offline: the examples come from
the task's train split in the data directory, solved in the same answer-only shape, before the question."""

from __future__ import annotations

import json

import pytest

from eval_fixtures import make_tiny_checkpoints

from loopus.cli import main
from loopus.eval.tasks.reasoning import load_gsm8k_nocot, load_prontoqa


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny_fewshot"))


@pytest.fixture(scope="module")
def samples(tiny, data_dir, tmp_path_factory):
    """The logged 2-shot requests of a tiny model on gsm8k_nocot and prontoqa, per task (one row per document:
    gsm8k_nocot logs each document once per filter)."""
    _, loop_dir = tiny
    out = tmp_path_factory.mktemp("fewshot_results")
    code = main(["lm-eval", "--data", str(data_dir), "--model", "loopus",
                 "--model_args", f"pretrained={loop_dir},num_loops=1", "--tasks", "gsm8k_nocot,prontoqa",
                 "--num_fewshot", "2", "--limit", "2", "--batch_size", "4", "--log_samples",
                 "--output_path", str(out)])
    assert code == 0
    [results] = list(out.rglob("results_*.json"))
    n_shot = json.loads(results.read_text())["n-shot"]
    assert n_shot == {"gsm8k_nocot": 2, "prontoqa": 2}
    rows = {task: [json.loads(line) for f in out.rglob(f"samples_{task}_*.jsonl") for line in f.open()]
            for task in n_shot}
    return {task: [r for r in rs if r["filter"] in ("none", "strict-match")] for task, rs in rows.items()}


def _shots(prompt: str, question: str) -> list[str]:
    """The blocks before the test question (lm-eval joins examples with a blank line)."""
    assert prompt.endswith(question)
    head = prompt[: -len(question)]
    assert head.endswith("\n\n")
    return head[:-2].split("\n\n")


def test_gsm8k_two_shot_prompt_has_two_solved_train_examples(samples, data_dir):
    train = load_gsm8k_nocot(data_dir=str(data_dir))["train"]
    solved = {f"Question: {q}\nAnswer: {a}" for q, a in zip(train["question"], train["answer"])}
    test_questions = set(load_gsm8k_nocot(data_dir=str(data_dir))["test"]["question"])
    assert len(samples["gsm8k_nocot"]) == 2
    for s in samples["gsm8k_nocot"]:
        prompt = s["arguments"]["gen_args_0"]["arg_0"]
        shots = _shots(prompt, f"Question: {s['doc']['question']}\nAnswer:")
        assert len(shots) == 2 and len(set(shots)) == 2
        assert all(shot in solved for shot in shots)  # a train question with its final number, answer only
        assert not any(shot.split("\nAnswer:")[0][len("Question: "):] in test_questions for shot in shots)


def test_prontoqa_two_shot_prompt_has_two_solved_train_examples(samples, data_dir):
    train = load_prontoqa(5, data_dir=str(data_dir))["train"]
    solved = {f"{q} {query}\nAnswer: {['True', 'False'][label]}"
              for q, query, label in zip(train["question"], train["query"], train["label"])}
    assert len(samples["prontoqa"]) == 2
    for s in samples["prontoqa"]:
        doc = s["doc"]
        question = f"{doc['question']} {doc['query']}\nAnswer:"
        for i, choice in enumerate(("True", "False")):  # both options are scored after the same context
            context, continuation = s["arguments"][f"gen_args_{i}"].values()
            assert continuation == f" {choice}"
            shots = _shots(context, question)
            assert len(shots) == 2 and all(shot in solved for shot in shots)
