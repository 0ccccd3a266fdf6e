"""The study of where loops pay: the ProntoQA ladder's training files, the closed-set option scorer (one
forward per item equals one row per option, batched equals alone, one loop equals the base model, exit
at the budget equals the fixed budget), and bench/reasoning.py end to end on a tiny model."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from eval_fixtures import gemma_tokenizer, make_tiny_checkpoints
from conftest import tiny_base

import loopus
from loopus.cli import main
from loopus.eval.options_score import OptionItem, encode_item, parse_exit_rules, score_items
from loopus.train.sft import sequence_start

torch.set_num_threads(1)

BENCH = Path(__file__).resolve().parents[1] / "bench"
DIGITS = tuple(f" {d}" for d in range(10))
TRUTH = (" True", " False")


# -- the ProntoQA ladder's training files ----------------------------------------------------------

def _rows(path):
    return [json.loads(line) for line in path.open()]


def test_prontoqa_ladder_mixes_exactly_the_asked_hops_shuffled_and_deterministic(data_dir, tmp_path):
    args = ["make-task", "prontoqa_ladder", "--data", str(data_dir), "--train-hops", "1-3"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert main([*args, "--out", str(tmp_path / "c"), "--seed", "1"]) == 0
    train = _rows(tmp_path / "a" / "sft" / "prontoqa_ladder" / "train.jsonl")
    valid = _rows(tmp_path / "a" / "sft" / "prontoqa_ladder" / "valid.jsonl")
    assert Counter(r["depth"] for r in train) == {1: 1500, 2: 1500, 3: 1500}
    assert Counter(r["depth"] for r in valid) == {1: 100, 2: 100, 3: 100}
    assert train == _rows(tmp_path / "b" / "sft" / "prontoqa_ladder" / "train.jsonl")  # same seed, same file
    other = _rows(tmp_path / "c" / "sft" / "prontoqa_ladder" / "train.jsonl")
    assert other != train and sorted(map(json.dumps, other)) == sorted(map(json.dumps, train))
    # shuffled across hops: the first 48 rows (a short run's whole data) hold every depth
    assert {r["depth"] for r in train[:48]} == {1, 2, 3} and {r["depth"] for r in valid[:30]} == {1, 2, 3}
    source = json.loads((data_dir / "prontoqa" / "2hop_train.jsonl").open().readline())
    expected = {"prompt": f"{source['question']} {source['query']}\nAnswer:", "completion": f" {source['answer']}",
                "depth": 2}
    assert expected in train
    assert main(["make-task", "prontoqa_ladder", "--data", str(data_dir), "--train-hops", "4,5", "--out",
                 str(tmp_path / "d")]) == 0
    assert {r["depth"] for r in _rows(tmp_path / "d" / "sft" / "prontoqa_ladder" / "train.jsonl")} == {4, 5}


def test_prontoqa_ladder_refuses_hops_the_data_does_not_have(data_dir, tmp_path, capsys):
    assert main(["make-task", "prontoqa_ladder", "--data", str(data_dir), "--train-hops", "2-6",
                 "--out", str(tmp_path)]) == 2
    assert "ProntoQA hops must be among 1-5, got [2, 3, 4, 5, 6]" in capsys.readouterr().err


# -- the option scorer -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return gemma_tokenizer()


@pytest.fixture(scope="module")
def models():
    """(plain tiny Gemma 3 with the real vocabulary, its LoopUS conversion with an open, input-dependent gate)."""
    base = tiny_base("gemma3_text", vocab_size=262144, max_position_embeddings=256, sliding_window=8)
    with torch.no_grad():
        for p in base.model.layers.parameters():
            p.mul_(4.0)
    looped = loopus.convert(copy.deepcopy(base), 2, 1, gate_init=0.5).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(looped.gate.up.weight, std=0.3)
    return base.eval(), looped


def _items() -> list[OptionItem]:
    prompts = ["a = 3\nb = a + 4\nWhat is b?\nAnswer:", "x = 1\nWhat is x?\nAnswer:",
               "Cats are mammals. Tom is a cat. True or false: Tom is a mammal.\nAnswer:",
               "Every wumpus is cold. Max is a wumpus. True or false: Max is not cold.\nAnswer:",
               "q = 9\nr = q + 2\ns = r + 5\nWhat is s?\nAnswer:"]
    options = [DIGITS, DIGITS, TRUTH, TRUTH, DIGITS]
    return [OptionItem(p, o, g, d, f"i{k}") for k, (p, o, g, d) in
            enumerate(zip(prompts, options, [7, 1, 0, 1, 6], [2, 1, 2, 2, 3]))]


def _logliks(records, kind="fixed"):
    return {(r["id"], n): torch.tensor(v["loglik"]) for r in records for n, v in r[kind].items()}


def _close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=tol, rtol=0, msg=lambda m: f"{key}: {m}")


def test_gemma_options_share_all_but_their_last_token(tok):
    start = sequence_start(tok)
    for item in _items():
        e = encode_item(tok, item, start)
        assert e.context[: len(start)] == start == [tok.bos_token_id] and e.shares_prefix
    digits = encode_item(tok, _items()[0], start)
    assert [len(o) for o in digits.options] == [2] * 10  # " 6" -> [▁, 6]
    assert [len(o) for o in encode_item(tok, _items()[2], start).options] == [1, 1]  # " True" -> [▁True]


def test_one_forward_per_item_equals_one_row_per_option(models, tok):
    _, looped = models
    items = _items()
    fast = list(score_items(looped, tok, items, loops=(1, 2, 4), batch_size=2, progress=False))
    slow = list(score_items(looped, tok, items, loops=(1, 2, 4), batch_size=2, shared_prefix=False, progress=False))
    _close(_logliks(fast), _logliks(slow))
    assert [r["id"] for r in fast] == [i.id for i in items] and set(fast[0]["fixed"]) == {"1", "2", "4"}
    # the loop changes the scores (else the comparisons above would be empty)
    assert not torch.allclose(_logliks(fast)[("i0", "1")], _logliks(fast)[("i0", "4")], atol=1e-3)


def test_batched_equals_alone_and_one_loop_equals_the_base_model(models, tok):
    base, looped = models
    items = _items()
    batched = _logliks(score_items(looped, tok, items, loops=(1, 2, 4), batch_size=5, progress=False))
    alone = _logliks(score_items(looped, tok, items, loops=(1, 2, 4), batch_size=1, progress=False))
    _close(batched, alone)
    plain = list(score_items(base, tok, items, loops=(1, 2, 4), batch_size=3, progress=False))
    assert all(set(r["fixed"]) == {"1"} for r in plain)  # a plain model has one depth
    _close(_logliks(plain), {k: v for k, v in batched.items() if k[1] == "1"})
    for r in plain:
        assert r["fixed"]["1"]["correct"] == (int(torch.tensor(r["fixed"]["1"]["loglik"]).argmax()) == r["gold"])
    with pytest.raises(ValueError, match="adaptive exit needs a LoopUS model"):
        next(score_items(base, tok, items, exit_rules=parse_exit_rules(["kl"], 4), progress=False))


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_exit_that_never_fires_is_the_fixed_budget_and_one_that_always_fires_stops_at_once(models, tok,
                                                                                           shared_prefix):
    _, looped = models
    items = _items()[:3] + [OptionItem("Is the sky blue?\nAnswer:", (" yes it is", " no"), 0, 1, "multi")]
    # an untrained confidence head says 0.5 everywhere: threshold 1 never fires; convergence 1e9 always does
    rules = parse_exit_rules(["threshold=1", "convergence=1e9", "kl=1e9"], 4)
    records = list(score_items(looped, tok, items, loops=(1, 4), exit_rules=rules, shared_prefix=shared_prefix,
                               progress=False))
    never = {(r["id"], "4"): torch.tensor(r["exit"]["threshold=1"]["loglik"]) for r in records}
    _close(never, {k: v for k, v in _logliks(records).items() if k[1] == "4"}, tol=1e-4)
    assert all(r["exit"]["threshold=1"]["loop_passes"] == 4 for r in records)
    assert all(r["exit"]["convergence=1e+09"]["loop_passes"] == 1 for r in records)
    assert all(r["exit"]["kl=1e+09"]["loop_passes"] == 2 for r in records)  # kl compares two passes
    with pytest.raises(ValueError, match="unknown exit_strategy"):
        parse_exit_rules(["sometimes"], 4)


# -- bench/reasoning.py end to end -----------------------------------------------------------------

@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import reasoning
    finally:
        sys.path.remove(str(BENCH))
    return reasoning


def test_study_trains_scores_and_reports_every_arm_on_the_same_items(bench, data_dir, tmp_path, monkeypatch, capsys):
    base_dir, _ = make_tiny_checkpoints(tmp_path / "tiny")
    out = tmp_path / "study"
    monkeypatch.setattr(bench, "ARMS", {"base": bench.Arm(None), "dense": bench.Arm("dense"),
                                        "default": bench.Arm("default", ("--lr", "1e-4"))})
    first = ["--out", str(out), "--data", str(data_dir), "--model", str(base_dir), "--split", "2,1", "--steps", "2",
             "--batch-size", "2", "--eval-every", "1", "--valid-examples", "3", "--save-every", "1"]
    assert bench.main([*first, "train", "dense"]) == 0
    study = json.loads((out / "study.json").read_text())
    assert study["steps"] == 2 and study["train_depths"] == [1, 2, 3] and study["test_depths"] == [1, 2, 3, 4, 5]
    flat = ["--out", str(out), "--data", str(data_dir)]
    assert bench.main([*flat, "train", "default"]) == 0
    rows = _rows(out / "data" / "sft" / "prontoqa_ladder" / "train.jsonl")
    assert {r["depth"] for r in rows} == {1, 2, 3}
    capsys.readouterr()
    assert bench.main([*flat, "train", "dense"]) == 0
    assert "dense: trained already" in capsys.readouterr().out
    # every arm trained with the study's settings, then its own flags
    logged = {arm: json.loads((out / arm / "model" / "train_config.json").read_text()) for arm in ("dense", "default")}
    shared = {arm: (c["dataset"]["corpus"], c["dataset"]["seq_len"], c["dataset"]["batch_size"], c["dataset"]["seed"],
                    c["max_steps"], c["build"]["encoder_layers"], c["build"]["decoder_layers"]) for arm, c in logged.items()}
    assert shared["dense"] == shared["default"] and shared["dense"][1:] == (224, 2, 0, 2, 2, 1)
    assert logged["dense"]["optim"]["lr"] == 5e-5 and logged["default"]["optim"]["lr"] == 1e-4  # the arm's own lr
    assert logged["dense"]["build"]["mode"] == "dense" and logged["default"]["build"]["mode"] == "loopus"
    for name in ("base", "dense", "default"):  # the exit rules on the first item of each depth only
        assert bench.main([*flat, "score", name, "--limit", "2", "--loops", "1,2,4", "--exit-limit", "1",
                           "--exit-rules", "threshold=1,convergence=1e9", "--items-per-batch", "3"]) == 0
    scores = {n: json.loads((out / n / "scores.json").read_text()) for n in ("base", "dense", "default")}
    ids = [r["id"] for r in scores["default"]["items"]]
    assert len(ids) == 10 and ids == [r["id"] for r in scores["dense"]["items"]]  # 2 per hop count, paired
    assert sorted({r["depth"] for r in scores["base"]["items"]}) == [1, 2, 3, 4, 5]
    assert scores["dense"]["loops"] == [1] and scores["dense"]["exit_rules"] == []  # a plain model: one depth
    assert scores["default"]["loops"] == [1, 2, 4] and scores["default"]["exit_rules"] == ["threshold=1",
                                                                                          "convergence=1e+09"]
    exited = [r for r in scores["default"]["items"] if r["exit"]]
    assert [r["id"] for r in exited] == ids[::2] and not scores["dense"]["items"][0]["exit"]
    assert {r["exit"]["threshold=1"]["loop_passes"] for r in exited} == {4}
    assert {r["exit"]["convergence=1e+09"]["loop_passes"] for r in exited} == {1}
    assert not list(out.glob("*/scores.partial.jsonl"))
    assert bench.main([*flat, "report"]) == 0
    for name in ("report.md", "report.json", "accuracy_vs_depth.png", "scaling.png", "exit_passes.png",
                 "learning_curves.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert set(report["groups"]) == {"in_distribution", "extrapolation"}
    first_item = scores["default"]["items"][0]
    assert report["accuracy"]["default"]["1"]["1"][2] == 2  # n items at depth 1
    diff = report["paired_vs_dense"]["default"]["1"]["in_distribution"]
    own = [r["fixed"]["1"]["correct"] - d["fixed"]["1"]["correct"]
           for r, d in zip(scores["default"]["items"], scores["dense"]["items"]) if r["depth"] <= 3]
    assert diff[0] == pytest.approx(sum(own) / len(own)) and diff[2] == 6
    assert report["exit"]["default"]["threshold=1"]["passes_saved"] == 0.0
    assert report["exit"]["default"]["convergence=1e+09"]["passes_saved"] == pytest.approx(0.75)
    assert report["exit"]["default"]["threshold=1"]["vs_fixed_budget"] == [0.0, 0.0, 5]  # never fires: the budget
    assert [p[0] for p in report["learning_curves"]["dense"]["1"]] == [0, 1, 2]  # validation every step
    assert report["summary"]["default"]["best_loops"] in ("1", "2", "4")
    assert report["summary"]["default"]["vs_dense_at_best"][2] == 4  # the extrapolation items, paired
    md = (out / "report.md").read_text()
    assert "## Summary" in md
    assert "## default" in md and "| threshold=1 |" in md and "Paired difference against dense" in md
    assert first_item["id"] == "1hop/" + json.loads((data_dir / "prontoqa" / "1hop_test.jsonl").open().readline())["id"]
    # forgetting: enwiki perplexity and lm-eval tasks at 1 loop, and a looped arm at its best loop count too
    for name in ("dense", "default"):
        assert bench.main([*flat, "forgetting", name, "--tokens", "300", "--limit", "2"]) == 0
    forgot = {n: json.loads((out / n / "forgetting.json").read_text()) for n in ("dense", "default")}
    best = bench.best_loop_count(scores["default"], 3)
    assert forgot["dense"]["loops"] == [1] and forgot["default"]["loops"] == sorted({1, best})
    for f in forgot.values():
        assert set(f["enwiki"]) == set(f["lm_eval"]) == {str(n) for n in f["loops"]}
        assert all(v["tokens"] == 300 and v["ppl"] > 1 for v in f["enwiki"].values())
        assert all(set(m) == {"arc_easy", "piqa"} and 0 <= m["piqa"]["acc"] <= 1 for m in f["lm_eval"].values())
    assert bench.main([*flat, "report"]) == 0
    md = (out / "report.md").read_text()
    assert "## Forgetting" in md and "| dense | 1 | " in md and "| default | 1 | " in md


def test_scoring_resumes_from_its_partial_file_and_refuses_other_settings(bench, data_dir, tmp_path, monkeypatch):
    base_dir, _ = make_tiny_checkpoints(tmp_path / "tiny")
    monkeypatch.setattr(bench, "ARMS", {"base": bench.Arm(None, model=str(base_dir))})
    out = tmp_path / "study"
    args = ["--out", str(out), "--data", str(data_dir), "score", "base", "--limit", "1"]
    assert bench.main(args) == 0
    scores = json.loads((out / "base" / "scores.json").read_text())
    settings = {k: scores[k] for k in ("loops", "exit_rules", "budget", "limit", "exit_limit", "depths")} | {"items": 5}
    kept = {**scores["items"][2], "fixed": {"1": {"loglik": [0.0, -1.0], "correct": True}}}
    (out / "base" / "scores.partial.jsonl").write_text(json.dumps(settings) + "\n" + json.dumps(kept) + "\n")
    assert bench.main(args) == 0
    again = json.loads((out / "base" / "scores.json").read_text())["items"]
    assert again[2] == kept and again[:2] + again[3:] == scores["items"][:2] + scores["items"][3:]
    (out / "base" / "scores.partial.jsonl").write_text(json.dumps({**settings, "limit": 7}) + "\n")
    with pytest.raises(SystemExit, match="was scored with other settings"):
        bench.main(args)


def test_study_refuses_changed_settings_missing_models_and_unknown_arms(bench, data_dir, tmp_path):
    out = tmp_path / "study"
    (out).mkdir()
    (out / "study.json").write_text(json.dumps(dataclasses.asdict(bench.Study(train_depths=(1, 2, 3),
                                                                                test_depths=(1, 2)))))
    with pytest.raises(SystemExit, match=r"--steps 5 \(study: 300\)"):
        bench.main(["--out", str(out), "--steps", "5", "train", "dense"])
    with pytest.raises(SystemExit, match="run `train dense` first"):
        bench.main(["--out", str(out), "--data", str(data_dir), "score", "dense"])
    with pytest.raises(SystemExit, match="unknown arm 'nope'"):
        bench.main(["--out", str(out), "train", "nope"])
    with pytest.raises(SystemExit, match="study.json not found"):
        bench.main(["--out", str(tmp_path / "empty"), "report"])
    argv = bench.train_argv(bench.Study(), out, "dense", bench.Arm("dense", ("--lr", "1")), str(data_dir))
    assert "--resume" not in argv and argv[-2:] == ["--lr", "1"] and argv.index("--lr") < len(argv) - 2
    (out / "dense" / "model").mkdir(parents=True)
    assert "--resume" in bench.train_argv(bench.Study(), out, "dense", bench.Arm("dense"), None)
    (out / "dense" / "model" / "metrics.json").write_text("{}")
    assert bench.train_argv(bench.Study(), out, "dense", bench.Arm("dense"), None) is None


@pytest.mark.parametrize("operation", ["add", "copy"])
def test_depthchain_study_scores_generated_items_at_every_depth(bench, tmp_path, monkeypatch, operation):
    base_dir, _ = make_tiny_checkpoints(tmp_path / "tiny")
    monkeypatch.setattr(bench, "ARMS", {"base": bench.Arm(None)})
    out = tmp_path / "study"
    # the study's options may also follow the sub-command
    assert bench.main(["--out", str(out), "score", "base", "--task", "depthchain", "--train-depths", "1-2",
                       "--test-depths", "1-5", "--train-size", "4", "--test-size", "3", "--model", str(base_dir),
                       "--limit", "2", "--operation", operation]) == 0
    study = json.loads((out / "study.json").read_text())
    assert study["task"] == "depthchain" and study["operation"] == operation
    items = json.loads((out / "base" / "scores.json").read_text())["items"]
    tests = {r["id"]: r for r in _rows(out / "data" / "depthchain" / "test.jsonl")}
    assert {r["operation"] for r in tests.values()} == {operation}
    other = "add" if operation == "copy" else "copy"
    with pytest.raises(SystemExit, match=f"--operation {other} \\(study: {operation}\\)"):
        bench.main(["--out", str(out), "--operation", other, "score", "base"])
    assert [r["depth"] for r in items] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    for r in items:
        assert r["gold"] == int(tests[r["id"]]["answer"]) and len(r["fixed"]["1"]["loglik"]) == 10
    assert bench.main(["report", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["groups"] == {"in_distribution": [1, 2], "extrapolation": [3, 4], "beyond": [5]}
    assert (out / "accuracy_vs_depth.png").is_file() and not (out / "exit_passes.png").exists()
    # an arm may be scored at some of the study's depths only (the same first items of each)
    assert bench.main(["--out", str(out), "score", "base", "--limit", "2", "--depths", "2-3"]) == 0
    subset = json.loads((out / "base" / "scores.json").read_text())
    assert [r["id"] for r in subset["items"]] == [r["id"] for r in items if r["depth"] in (2, 3)]
    assert subset["depths"] == [2, 3]
    with pytest.raises(SystemExit, match=r"--depths \[9\] are not test depths of the study"):
        bench.main(["--out", str(out), "score", "base", "--depths", "2,9"])
