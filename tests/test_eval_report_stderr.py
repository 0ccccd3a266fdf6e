"""Reports keep each accuracy's standard error as its own metric, and a requested group's members as rows
(accuracy per depth for the laddered tasks)."""

from __future__ import annotations

from loopus.eval.harness import write_eval_report
from loopus.eval.report import flatten_results, requested_results, stderr_name

RAW = {
    "results": {
        "ladder": {"alias": "ladder", "acc,none": 0.5, "acc_stderr,none": 0.25},
        "ladder_k1": {"alias": " - ladder_k1", "acc,none": 1.0, "acc_stderr,none": 0.0},
        "ladder_k2": {"alias": " - ladder_k2", "acc,none": 0.0, "acc_stderr,none": 0.0},
        "gsm": {"exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.5,
                "exact_match,flexible-extract": 1.0, "exact_match_stderr,flexible-extract": "N/A"},
        "other": {"acc,none": 0.75, "acc_stderr,none": 0.1},
    },
    "groups": {"ladder": {"acc,none": 0.5, "acc_stderr,none": 0.25}},
    "group_subtasks": {"ladder": ["ladder_k1", "ladder_k2"], "ladder_k1": [], "ladder_k2": [], "gsm": [],
                       "other": []},
}


def test_stderr_name_follows_the_metric_and_its_filter():
    assert stderr_name("acc") == "acc_stderr"
    assert stderr_name("exact_match[strict-match]") == "exact_match_stderr[strict-match]"


def test_flatten_results_keeps_stderr_as_its_own_metric_when_asked():
    flat = flatten_results(RAW, stderr=True)
    assert flat["ladder_k1"] == {"acc": 1.0, "acc_stderr": 0.0}
    # a standard error lm-eval could not compute ("N/A", e.g. one document) is left out, not made up
    assert flat["gsm"] == {"exact_match[strict-match]": 0.5, "exact_match_stderr[strict-match]": 0.5,
                           "exact_match[flexible-extract]": 1.0}


def test_requested_group_reports_its_members_and_nothing_else():
    rows = requested_results(RAW, ["ladder", "gsm"])
    assert list(rows) == ["ladder", "ladder_k1", "ladder_k2", "gsm"]  # the group, then each depth
    assert rows["ladder"] == {"acc": 0.5, "acc_stderr": 0.25}
    assert rows["ladder_k2"] == {"acc": 0.0, "acc_stderr": 0.0}
    assert requested_results(RAW, ["ladder_k2"]) == {"ladder_k2": {"acc": 0.0, "acc_stderr": 0.0}}


def test_eval_report_writes_stderr_rows_and_plots_with_them(tmp_path):
    rows = requested_results(RAW, ["ladder", "gsm"])
    loops = {1: rows, 2: rows}
    points = [{"label": f"fixed {n}", "mean_loop_passes": float(n), "metrics": rows} for n in loops]
    files = write_eval_report(tmp_path, {"loops": loops, "points": points}, "stderr")
    md = files["markdown"].read_text()
    assert "| ladder_k1 | acc_stderr | 0.0000 | 0.0000 |" in md
    assert "| gsm | exact_match_stderr[strict-match] | 0.5000 | 0.5000 |" in md
    assert files["metric_vs_loops"].read_bytes()[:4] == b"\x89PNG"
