"""Loop settings that are not integers are refused in one message, never truncated; renamed keywords still work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_base, tiny_looped

import loopus
from loopus import LoopKVCache, SplitError
from loopus.dynamics import convert_auto
from loopus.halting import ExitRule

IDS = torch.tensor([[5, 6, 7]])


def generate(model, **kwargs):
    with torch.no_grad():
        return model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=2, do_sample=False,
                              pad_token_id=0, **kwargs)


@pytest.mark.parametrize("value", ["4", 2.0, True, 2.5])
def test_generate_refuses_a_loop_budget_that_is_not_an_integer(value):
    with pytest.raises(ValueError, match=f"num_loops must be an integer, got {value!r}"):
        generate(tiny_looped(), num_loops=value)


@pytest.mark.parametrize("value", [2.5, 2.0, "2", True])
def test_min_loops_that_is_not_an_integer_is_refused_not_truncated(value):
    model = tiny_looped()
    with pytest.raises(ValueError, match=f"min_loops must be an integer, got {value!r}"):
        generate(model, num_loops=3, exit_strategy="kl", min_loops=value)
    with pytest.raises(ValueError, match="min_loops must be an integer"):
        ExitRule.build(None, None, value, 3)


def test_an_exit_threshold_given_as_text_is_refused():
    with pytest.raises(ValueError, match="exit_threshold must be a number, got '0.5'"):
        ExitRule.build("kl", "0.5", None, 3)


@pytest.mark.parametrize("encoder, decoder", [(2.7, 1), (2, 1.5), (False, 1)])
def test_a_fractional_split_is_refused_by_convert_and_convert_auto(encoder, decoder):
    with pytest.raises(SplitError, match="must be a layer count"):
        loopus.convert(tiny_base("llama"), encoder, decoder)
    with pytest.raises(SplitError, match="must be a layer count"):
        convert_auto(tiny_base("llama"), (encoder, decoder))


def test_a_split_file_with_fractional_counts_is_refused(tmp_path):
    (tmp_path / "split.json").write_text(json.dumps({"split": {"encoder_layers": 2.7, "decoder_layers": 1}}))
    with pytest.raises(SplitError, match=r"must be layer counts \(integers\), got \(2.7, 1\)"):
        convert_auto(tiny_base("llama"), tmp_path / "split.json")


def test_old_keyword_names_work_and_warn():
    model = tiny_looped()
    with pytest.warns(DeprecationWarning, match="max_depth"):
        cache = LoopKVCache(model.config.base_config, 2, 1, max_depth=3)
    assert cache.num_loops == 3
    with pytest.warns(DeprecationWarning, match="max_depth"):
        assert model.new_cache(max_depth=2).num_loops == 2
    with pytest.warns(DeprecationWarning, match="max_loops"):
        rule = ExitRule.build("kl", None, None, max_loops=4)
    assert rule.num_loops == 4
    with pytest.warns(DeprecationWarning, match="use num_loops"):
        assert rule.max_loops == 4
    with pytest.raises(TypeError, match="both num_loops= and its old name max_depth="):
        model.new_cache(3, max_depth=3)


def test_the_cache_forward_block_stores_and_records_on_leaving():
    """Reasoning-layer KV goes through `with cache.forward()`: outside it the cache refuses such writes,
    and a block left without the loop's passes stores nothing."""
    model = tiny_looped()
    cache = model.new_cache(3)
    key = torch.zeros(1, 1, 1, 4)
    with pytest.raises(ValueError, match="inside `with cache.forward"):
        cache.at(0).update(key, key, 2)
    with pytest.raises(RuntimeError, match="without setting loop_passes"):
        with cache.forward():
            pass
    with torch.no_grad():
        model(IDS, past_key_values=cache, num_loops=2)
    assert cache.loop_passes.tolist() == [[2, 2, 2]]
    # the depth nobody ran holds the latest KV: a copy of depth 2's
    assert torch.equal(cache.layers[cache.slot(2, 2)].keys, cache.layers[cache.slot(2, 1)].keys)
