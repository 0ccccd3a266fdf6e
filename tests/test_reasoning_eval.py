"""Every reasoning task scores a tiny LoopUS model end to end, at several loop counts and with an exit
rule, through `loopus eval` and through lm-eval's own command line (`loopus lm-eval`)."""

from __future__ import annotations

import json

import pytest

from eval_fixtures import make_tiny_checkpoints

from loopus.cli import main
from loopus.eval.report import stderr_name
from loopus.tasks import write_depthchain

TASKS = ["prontoqa", *(f"prontoqa_{h}hop" for h in range(1, 5)), "prosqa", "gsm8k_nocot", "mult_4x4", "mult_5x5",
         *(f"depthchain_k{k}" for k in range(1, 17))]
GROUPS = ["prontoqa_ladder", "prosqa", "gsm8k_nocot", "mult_4x4", "mult_5x5", "depthchain"]


def _metric(task: str) -> str:
    """Log-likelihood accuracy for the closed answer sets, exact match of the generated answer otherwise."""
    return "acc" if task.startswith(("prontoqa", "prosqa")) else "exact_match[strict-match]"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny_reasoning"))


@pytest.fixture(scope="module")
def reasoning_data(tmp_path_factory, data_dir):
    """The shared reasoning sets, and a small generated depthchain, in one data directory."""
    root = tmp_path_factory.mktemp("reasoning_data")
    for name in ("prontoqa", "prosqa", "gsm8k", "multiplication"):
        (root / name).symlink_to(data_dir / name)
    write_depthchain(root, seed=0, train_depths=[1, 2], train_size=2, valid_size=1, test_size=2, distractors=1)
    return root


def test_loopus_eval_scores_every_task_at_each_loop_count_and_exit_rule(tiny, reasoning_data, tmp_path):
    _, loop_dir = tiny
    out = tmp_path / "report"
    code = main(["eval", str(loop_dir), "--data", str(reasoning_data), "--tasks", ",".join(TASKS), "--limit", "2",
                 "--num-loops", "1,2,4", "--exit-strategy", "threshold", "--exit-threshold", "0.9",
                 "--batch-size", "4", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [p["label"] for p in report["points"]] == ["fixed 1", "fixed 2", "fixed 4", "t=0.9"]
    assert [p["mean_loop_passes"] for p in report["points"][:3]] == [1.0, 2.0, 4.0]
    assert 1.0 <= report["points"][3]["mean_loop_passes"] <= 4.0
    for point in report["points"]:
        assert sorted(point["metrics"]) == sorted(TASKS)
        for task in TASKS:
            assert point["metrics"][task][_metric(task)] in (0.0, 0.5, 1.0)  # a share of the 2 documents


@pytest.mark.parametrize("num_loops", [1, 2, 4])
def test_lm_eval_cli_scores_every_task_with_stderr_and_per_depth(tiny, reasoning_data, tmp_path, num_loops):
    _, loop_dir = tiny
    out = tmp_path / "results"
    code = main(["lm-eval", "--data", str(reasoning_data), "--model", "loopus",
                 "--model_args", f"pretrained={loop_dir},num_loops={num_loops}", "--tasks", ",".join(GROUPS),
                 "--limit", "2", "--batch_size", "4", "--output_path", str(out)])
    assert code == 0
    [result_file] = list(out.rglob("results_*.json"))
    results = json.loads(result_file.read_text())["results"]
    assert set(TASKS) <= set(results)  # every depth of the laddered tasks has its own row
    assert {"prontoqa_ladder", "depthchain"} <= set(results)  # and the pooled group
    for task in TASKS:
        metric, _, filt = _metric(task).partition("[")
        key = f"{metric},{filt.rstrip(']') or 'none'}"
        assert results[task][key] in (0.0, 0.5, 1.0)
        assert results[task][key.replace(",", "_stderr,")] >= 0.0  # accuracy with its standard error


def test_loopus_eval_reports_stderr_and_every_depth_of_a_requested_group(tiny, reasoning_data, tmp_path):
    """`loopus eval --tasks GROUP` reports the pooled group and each member (each depth), every accuracy
    beside its standard error, in report.json and report.md."""
    _, loop_dir = tiny
    out = tmp_path / "report"
    code = main(["eval", str(loop_dir), "--data", str(reasoning_data), "--tasks", "prontoqa_ladder,depthchain,prosqa",
                 "--limit", "2", "--num-loops", "1,2", "--batch-size", "4", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    ladder = [f"prontoqa_{h}hop" for h in range(1, 5)] + ["prontoqa"]
    chain = [f"depthchain_k{k}" for k in range(1, 17)]
    expected = ["prontoqa_ladder", *ladder, "depthchain", *chain, "prosqa"]
    md = (out / "report.md").read_text()
    for n in ("1", "2"):
        metrics = report["loops"][n]
        assert list(metrics) == expected  # each group, then its members in order
        for task in [*ladder, *chain, "prosqa"]:
            metric = _metric(task)
            acc, err = metrics[task][metric], metrics[task][stderr_name(metric)]
            # the standard error of a mean of 2 scores of 0 or 1: 0.5 when they differ, else 0
            assert acc in (0.0, 0.5, 1.0) and err == pytest.approx(0.5 if acc == 0.5 else 0.0)
        assert metrics["prontoqa_ladder"]["acc_stderr"] >= 0.0
        assert metrics["depthchain"]["exact_match_stderr[strict-match]"] >= 0.0
    assert "| depthchain_k16 | exact_match_stderr[strict-match] |" in md and "| prontoqa_ladder | acc_stderr |" in md
