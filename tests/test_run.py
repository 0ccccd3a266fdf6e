"""`loopus run`: the main job end to end on a tiny model, and honest reporting of unavailable stages."""

from __future__ import annotations

import json

import pytest

from eval_fixtures import make_tiny_checkpoints

from loopus.cli import main
from loopus.commands import run as run_cmd


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    base_dir, _ = make_tiny_checkpoints(tmp_path_factory.mktemp("tiny_run"))
    return base_dir


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
    monkeypatch.setattr(run_cmd, "stage_available", lambda stage: (True, "stub"))
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


def test_stage_availability_is_detected_by_import():
    for stage in run_cmd.STAGE_ENTRY_POINTS:
        ok, why = run_cmd.stage_available(stage)
        module, attr = run_cmd.STAGE_ENTRY_POINTS[stage]
        assert (f"{module}.{attr}" in why) and (ok or "not available" in why)


def test_run_says_which_stage_is_unavailable(tiny_base, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(run_cmd.STAGE_ENTRY_POINTS, "train", ("loopus.no_such_stage", "train"))
    monkeypatch.setitem(run_cmd.STAGE_ENTRY_POINTS, "analyze", ("loopus.dynamics", "no_such_function"))
    out = tmp_path / "run"
    code = main(["run", "--model", str(tiny_base), "--data", str(data_dir), "--out", str(out),
                 "--loops", "1,2", "--skip", "evaluate"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "[train] unavailable: loopus.no_such_stage.train" in printed
    assert "[analyze] unavailable: loopus.dynamics.no_such_function" in printed
    report = json.loads((out / "run.json").read_text())
    assert set(report["unavailable"]) == {"train", "analyze"}
    stages = {s["stage"]: s["status"] for s in report["stages"]}
    assert stages["train"] == stages["dense"] == stages["analyze"] == "unavailable"
    assert any("not post-trained" in n for n in report["notes"])
    assert report["split"] == {"encoder_layers": 2, "decoder_layers": 1}
    assert "Unavailable stages" in (out / "report.md").read_text()
