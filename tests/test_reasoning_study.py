"""The study of where loops pay: the ProntoQA ladder's training files, the closed-set option scorer (one
forward per item equals one row per option, batched equals alone, one loop equals the base model, exit
at the budget equals the fixed budget), and bench/reasoning.py end to end on a tiny model."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch

from eval_fixtures import gemma_tokenizer
from conftest import tiny_base

import loopus
from loopus.cli import main
from loopus.eval.options_score import OptionItem, encode_item, parse_exit_rules, score_items
from loopus.train.sft import sequence_start

torch.set_num_threads(1)

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
def test_exit_that_never_fires_is_the_fixed_budget_and_one_that_always_fires_takes_one_pass(models, tok,
                                                                                           shared_prefix):
    _, looped = models
    items = _items()[:3] + [OptionItem("Is the sky blue?\nAnswer:", (" yes it is", " no"), 0, 1, "multi")]
    # an untrained confidence head says 0.5 everywhere: threshold 1 never fires; convergence 1e9 always does
    rules = parse_exit_rules(["threshold=1", "convergence=1e9"], 4)
    records = list(score_items(looped, tok, items, loops=(1, 4), exit_rules=rules, shared_prefix=shared_prefix,
                               progress=False))
    never = {(r["id"], "4"): torch.tensor(r["exit"]["threshold=1"]["loglik"]) for r in records}
    _close(never, {k: v for k, v in _logliks(records).items() if k[1] == "4"}, tol=1e-4)
    assert all(r["exit"]["threshold=1"]["loop_passes"] == 4 for r in records)
    assert all(r["exit"]["convergence=1e+09"]["loop_passes"] == 1 for r in records)
    with pytest.raises(ValueError, match="unknown exit_strategy"):
        parse_exit_rules(["sometimes"], 4)
