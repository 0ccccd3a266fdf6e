"""Per-loop perplexity over documents, with a standard error across windows."""

from __future__ import annotations

import math

import pytest
import torch

import loopus
from loopus.eval.perplexity import mean_and_se, per_loop_perplexity
from conftest import char_tokenizer, tiny_base

DOCS = ["the cat sat on the mat. " * 6, "a dog ran to the park and back. " * 5, "rivers flow into the sea. " * 4]


def test_mean_and_se_is_the_token_mean_with_a_spread_that_shrinks_with_more_windows():
    sums, counts = [10.0, 12.0, 8.0, 11.0], [5, 5, 5, 4]
    mean, se = mean_and_se(sums, counts)
    assert mean == pytest.approx(41.0 / 19)
    assert se > 0
    _, se_more = mean_and_se(sums * 4, counts * 4)
    assert se_more < se / 1.9
    assert mean_and_se([2.0, 4.0], [2, 4])[1] == pytest.approx(0.0, abs=1e-12)  # equal per-token rate


def test_documents_are_windowed_separately_and_every_token_is_scored_once():
    tokenizer = char_tokenizer()
    model = loopus.convert(tiny_base("llama"), 2, 1).eval()
    result = per_loop_perplexity(model, tokenizer, DOCS, loops=(1, 2), window=16, progress=False, return_windows=True)
    lengths = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in DOCS]
    assert result[1]["tokens"] == sum(lengths)
    assert len(result[1]["windows"]) == sum(math.ceil(n / 16) for n in lengths)  # no window spans two documents
    assert sum(s for s, _ in result[2]["windows"]) / sum(lengths) == pytest.approx(result[2]["nll"])
    assert math.isfinite(result[1]["nll_se"]) and result[1]["nll_se"] > 0
    one_doc = per_loop_perplexity(model, tokenizer, DOCS[:1], loops=(1,), window=16, progress=False,
                                  return_windows=True)
    alone = one_doc[1]["windows"]
    assert [c for _, c in alone] == [c for _, c in result[1]["windows"][: len(alone)]]
    assert [s for s, _ in alone] == pytest.approx([s for s, _ in result[1]["windows"][: len(alone)]], rel=1e-5)


def test_max_tokens_caps_the_total_over_documents():
    tokenizer = char_tokenizer()
    model = loopus.convert(tiny_base("llama"), 2, 1).eval()
    result = per_loop_perplexity(model, tokenizer, DOCS, loops=(1,), max_tokens=200, window=64, progress=False)
    assert result[1]["tokens"] == 200
    with torch.no_grad(), pytest.raises(ValueError, match="at least 2 tokens"):
        per_loop_perplexity(model, tokenizer, ["a"], loops=(1,), progress=False)
