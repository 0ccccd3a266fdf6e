"""`loopus run`: the main job end to end on a tiny model, skipped stages, and errors that stop the job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval_fixtures import make_tiny_checkpoints

from loopus.cli import main
from loopus.commands import run as run_cmd


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    base_dir, _ = make_tiny_checkpoints(tmp_path_factory.mktemp("tiny_run"))
    return base_dir


def drawn_figures(monkeypatch) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Filled as the report's figures are saved: {file name: {panel title: {line label: y data}}}."""
    import loopus.eval.report as report

    drawn, save = {}, report.save_figure

    def labelled(ax) -> dict[str, list[float]]:
        # plain lines, and error-bar curves (their label is on the container, the data line is its first)
        lines = [(line.get_label(), line) for line in ax.get_lines()]
        lines += [(c.get_label(), c.lines[0]) for c in ax.containers if hasattr(c, "has_yerr")]
        return {label: [float(y) for y in line.get_ydata()] for label, line in lines if not label.startswith("_")}

    def recording(fig, path, *args, **kwargs):
        drawn[Path(path).name] = {ax.get_title(): labelled(ax) for ax in fig.axes if ax.get_title()}
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(report, "save_figure", recording)
    return drawn


def test_run_wires_every_stage_into_the_report(tiny_base, data_dir, tmp_path, monkeypatch):
    """The job calls analyze -> convert -> train (LoopUS, dense) -> evaluate -> report and uses each output.

    analyze and train are stubbed here (their own tests cover them; on CPU they take minutes even on a
    tiny model); conversion, lm-eval evaluation, perplexity and the report run for real.
    """
    import shutil

    from loopus.modeling import LoopUSForCausalLM

    calls = []

    def fake_analyze(base, tokenizer, data, tokens, out):
        calls.append("analyze")
        return 1, 2, {"split": {"encoder_layers": 1, "decoder_layers": 2}}

    def fake_train(model_dir, out, mode, data, settings):
        calls.append((mode, str(model_dir), settings["max_steps"]))
        if mode == "loopus":
            LoopUSForCausalLM.from_pretrained(model_dir).save_pretrained(out)
            shutil.copy(model_dir / "tokenizer.json", out / "tokenizer.json")
            shutil.copy(model_dir / "tokenizer_config.json", out / "tokenizer_config.json")
        else:
            shutil.copytree(model_dir, out, dirs_exist_ok=True)
        return {"mode": mode}

    monkeypatch.setattr(run_cmd, "stage_analyze", fake_analyze)
    monkeypatch.setattr(run_cmd, "stage_train", fake_train)
    drawn = drawn_figures(monkeypatch)
    out = tmp_path / "run"
    code = main(["run", "--model", str(tiny_base), "--data", str(data_dir), "--out", str(out),
                 "--tasks", "arc_easy", "--limit", "2", "--loops", "1,2", "--train-steps", "3"])
    assert code == 0
    assert calls == ["analyze", ("loopus", str(out / "converted"), 3), ("dense", str(tiny_base), 3)]
    report = json.loads((out / "run.json").read_text())
    stages = {s["stage"]: s["status"] for s in report["stages"]}
    assert stages == {s: "done" for s in ["analyze", "convert", "train", "dense", "evaluate", "report"]}
    assert report["split"] == {"encoder_layers": 1, "decoder_layers": 2}
    assert json.loads((out / "converted" / "config.json").read_text())["encoder_layers"] == 1
    # base and dense through lm-eval's hf model, LoopUS (the trained dir) at every loop count
    assert {"base", "dense", "loopus (loops=1)", "loopus (loops=2)"} <= set(report["results"])
    assert report["results"]["base"]["arc_easy"]["acc"] == report["results"]["loopus (loops=1)"]["arc_easy"]["acc"]
    held_out = report["held_out_perplexity"]
    assert set(held_out) == {"enwiki", "eltec_eng", "wikitext2"}
    for corpus in held_out.values():  # base and dense at one loop, LoopUS at every loop count
        assert set(corpus) == {"base", "dense", "loopus"}
        assert set(corpus["base"]) == set(corpus["dense"]) == {"1"} and set(corpus["loopus"]) == {"1", "2"}
        # the stub trained nothing: one loop of LoopUS and the dense copy score exactly as the base
        assert corpus["loopus"]["1"]["nll"] == corpus["dense"]["1"]["nll"] == corpus["base"]["1"]["nll"]
        assert corpus["base"]["1"]["tokens"] == 2048
    assert "Base vs dense vs LoopUS" in (out / "report.md").read_text()
    assert (out / "eval" / "metric_vs_loops.png").exists() and (out / "eval" / "compute_vs_quality.png").exists()
    points = json.loads((out / "eval" / "report.json").read_text())["points"]
    assert [p["label"] for p in points][:2] == ["fixed 1", "fixed 2"]
    # every plot draws base and dense as labelled horizontal lines beside the looped curve
    results = report["results"]
    assert set(drawn) == {"metric_vs_loops.png", "compute_vs_quality.png", "held_out_vs_loops.png"}
    for name in ("metric_vs_loops.png", "compute_vs_quality.png"):
        panel = drawn[name]["arc_easy acc"]
        assert set(panel) == {"LoopUS", "base", "dense"}
        assert panel["base"] == [results["base"]["arc_easy"]["acc"]] * 2
        assert panel["dense"] == [results["dense"]["arc_easy"]["acc"]] * 2
    assert drawn["metric_vs_loops.png"]["arc_easy acc"]["LoopUS"] == [
        results[f"loopus (loops={n})"]["arc_easy"]["acc"] for n in (1, 2)]
    for corpus, by_model in held_out.items():
        panel = drawn["held_out_vs_loops.png"][f"{corpus} perplexity"]
        assert panel["base"] == [by_model["base"]["1"]["ppl"]] * 2 and panel["dense"] == [by_model["dense"]["1"]["ppl"]] * 2
        assert panel["LoopUS"] == pytest.approx([by_model["loopus"][n]["ppl"] for n in ("1", "2")])
    assert "held_out_vs_loops.png" in (out / "report.md").read_text()


def test_skipped_stages_are_reported_and_the_default_split_is_used(tiny_base, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_cmd, "stage_held_out", lambda *args: {})  # scored for real in the test above
    out = tmp_path / "run"
    code = main(["run", "--model", str(tiny_base), "--data", str(data_dir), "--out", str(out),
                 "--loops", "1,2", "--skip", "analyze,train,dense,evaluate"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "run.json").read_text())
    stages = {s["stage"]: s["status"] for s in report["stages"]}
    assert stages == {"analyze": "skipped", "convert": "done", "train": "skipped", "dense": "skipped",
                      "evaluate": "skipped", "report": "done"}
    assert report["split"] == {"encoder_layers": 2, "decoder_layers": 1}
    assert json.loads((out / "converted" / "config.json").read_text())["encoder_layers"] == 2
    assert report["notes"] == ["split not analyzed (skipped by --skip); default encoder 2, decoder 1 used",
                               "LoopUS was not post-trained: the LoopUS rows are the untrained conversion"]
    assert report["results"] == {}


def test_an_evaluation_error_stops_the_job(tiny_base, data_dir, tmp_path, monkeypatch, capsys):
    """No retry without adaptive exit: an error from evaluating LoopUS ends the run, in one line."""
    import loopus.eval.harness as harness

    calls = []

    def refusing(*args, **kwargs):
        calls.append(kwargs)
        raise ValueError("unknown exit_strategy 'threshold'")

    monkeypatch.setattr(harness, "evaluate_hf", lambda *args, **kwargs: {})
    monkeypatch.setattr(harness, "evaluate_loopus", refusing)
    code = main(["run", "--model", str(tiny_base), "--data", str(data_dir), "--out", str(tmp_path / "run"),
                 "--loops", "1", "--skip", "analyze,train,dense"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "loopus run: error: unknown exit_strategy 'threshold'"
    assert len(calls) == 1
