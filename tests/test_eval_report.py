"""Reports: flattened lm-eval results, markdown tables and the two plots."""

from __future__ import annotations

from loopus.eval.harness import write_eval_report
from loopus.eval.report import flatten_results, markdown_table, metric_rows


def test_flatten_results_drops_stderr_and_filters():
    raw = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6},
                       "lambada_openai": {"perplexity,none": 12.5, "acc,none": 0.4}}}
    assert flatten_results(raw) == {"arc_easy": {"acc": 0.5, "acc_norm": 0.6},
                                    "lambada_openai": {"perplexity": 12.5, "acc": 0.4}}


def test_markdown_table_one_column_per_model():
    rows = metric_rows({"base": {"arc_easy": {"acc": 0.5}}, "loopus": {"arc_easy": {"acc": 0.625}}})
    table = markdown_table(rows)
    assert table.splitlines()[0] == "| task | metric | base | loopus |"
    assert "| arc_easy | acc | 0.5000 | 0.6250 |" in table


def test_eval_report_writes_json_markdown_and_both_plots(tmp_path):
    loops = {1: {"arc_easy": {"acc": 0.5}, "wikitext": {"word_perplexity": 40.0}},
             4: {"arc_easy": {"acc": 0.55}, "wikitext": {"word_perplexity": 35.0}}}
    points = [{"label": "fixed 1", "mean_loop_passes": 1.0, "metrics": loops[1]},
              {"label": "fixed 4", "mean_loop_passes": 4.0, "metrics": loops[4]},
              {"label": "t=0.9", "threshold": 0.9, "mean_loop_passes": 2.3, "metrics": loops[4]}]
    files = write_eval_report(tmp_path, {"loops": loops, "points": points}, "test")
    for key in ("json", "markdown", "metric_vs_loops", "compute_vs_quality"):
        assert files[key].exists() and files[key].stat().st_size > 0
    assert files["metric_vs_loops"].read_bytes()[:4] == b"\x89PNG"
    md = files["markdown"].read_text()
    assert "loops=1" in md and "t=0.9" in md and "2.3" in md
