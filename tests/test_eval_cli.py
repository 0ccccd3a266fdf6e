"""`loopus lm-eval` (lm-eval's own CLI, model registered, offline tasks) and `loopus eval` (the wrapper)."""

from __future__ import annotations

import json
import os

import pytest

from eval_fixtures import make_tiny_checkpoints, write_openbookqa, write_winogrande

from loopus.cli import main
from loopus.halting import STRATEGIES


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny_cli"))


@pytest.fixture()
def small_data(tmp_path):
    write_winogrande(tmp_path)
    write_openbookqa(tmp_path)
    return tmp_path


def test_lm_eval_cli_passes_every_flag_through(tiny, small_data, tmp_path):
    _, loop_dir = tiny
    out = tmp_path / "results"
    before = os.environ.get("LOOPUS_DATA")
    code = main([
        "lm-eval", "--data", str(small_data), "--model", "loopus",
        "--model_args", f"pretrained={loop_dir},num_loops=2", "--tasks", "winogrande,openbookqa",
        "--limit", "2", "--batch_size", "2", "--output_path", str(out), "--log_samples",
    ])
    assert code == 0
    assert os.environ.get("LOOPUS_DATA") == before  # the command's --data did not leak
    [result_file] = list(out.rglob("results_*.json"))
    results = json.loads(result_file.read_text())
    assert set(results["results"]) == {"winogrande", "openbookqa"}
    assert "num_loops=2" in results["config"]["model_args"] or results["config"]["model_args"]["num_loops"] == 2
    assert list(out.rglob("samples_winogrande_*.jsonl"))  # --log_samples went through


def test_eval_wrapper_writes_report_and_plots(tiny, small_data, tmp_path):
    _, loop_dir = tiny
    out = tmp_path / "report"
    before = os.environ.get("LOOPUS_DATA")
    code = main(["eval", str(loop_dir), "--data", str(small_data), "--tasks", "openbookqa", "--limit", "3",
                 "--loops", "1,2", "--out", str(out)])
    assert code == 0
    # --data points the offline tasks at small_data for the command only, not for what runs after it
    assert os.environ.get("LOOPUS_DATA") == before
    report = json.loads((out / "report.json").read_text())
    assert set(report["loops"]) == {"1", "2"}
    assert (out / "metric_vs_loops.png").exists() and (out / "compute_vs_quality.png").exists()
    assert [p["mean_loop_passes"] for p in report["points"]] == [1.0, 2.0]
    assert "loops=2" in (out / "report.md").read_text()


def test_eval_wrapper_refuses_unsupported_exit_clearly(tiny, small_data, tmp_path, capsys):
    _, loop_dir = tiny
    code = main(["eval", str(loop_dir), "--data", str(small_data), "--tasks", "openbookqa", "--limit", "1",
                 "--loops", "2", "--exit-strategy", "no-such-strategy", "--thresholds", "0.5", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # one line that names the bad strategy and the ones to choose from
    assert err[-1] == f"loopus eval: error: unknown exit_strategy 'no-such-strategy': choose one of {', '.join(STRATEGIES)}"
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("flags", [["--num-loops", "1,2"], ["--exit-strategy", "kl"]])
def test_eval_refuses_loop_settings_for_a_model_that_is_not_looped(tiny, small_data, tmp_path, capsys, flags):
    base_dir, _ = tiny
    code = main(["eval", str(base_dir), "--data", str(small_data), "--tasks", "openbookqa", "--limit", "1", *flags,
                 "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("loopus eval: error: ") and "not a LoopUS checkpoint" in err[-1]
    assert "loopus convert" in err[-1] and not (tmp_path / "report.json").exists()
