"""LoopKVCache: slot layout, the KV of tokens that exit early, constant-memory mode, prefill, cache API."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import tiny_looped

from loopus import LoopKVCache
from loopus.compat import output_cache


tiny = partial(tiny_looped, num_loops=4)


def force_confident(model, confident: bool = True) -> None:
    """Make the confidence head say ~1 (or ~0) for every token, so `threshold` exits at min_loops."""
    torch.nn.init.zeros_(model.confidence_head.proj.weight)
    torch.nn.init.constant_(model.confidence_head.proj.bias, 30.0 if confident else -30.0)


def step(model, ids, cache, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs)


def test_slot_layout_and_budget_check():
    model = tiny()
    cache = model.new_cache(3)
    reasoning = model.config.reasoning_range  # layers 2..4 of 6
    assert len(cache.layers) == 2 + 3 * len(reasoning) + 1
    assert [cache.slot(i) for i in (0, 1)] == [0, 1]
    assert cache.slot(2, 0) == 2 and cache.slot(2, 1) == 5 and cache.slot(4, 2) == 10
    assert cache.slot(5) == 11
    with pytest.raises(ValueError, match="holds 3 loop depths but loop 4"):
        cache.slot(2, 3)
    shared = model.new_cache(3, "shared")
    assert len(shared.layers) == 2 + len(reasoning) + 1
    assert shared.slot(3, 0) == shared.slot(3, 2)
    with pytest.raises(ValueError, match="num_loops must be >= 1"):
        model.new_cache(0)
    with pytest.raises(ValueError, match="num_loops must be >= 1"):
        LoopKVCache(model.config.base_config, 2, 1, 0)
    key = torch.zeros(1, 1, 1, 4)
    with pytest.raises(ValueError, match="reasoning layer: its KV depends on the loop depth"):
        cache.update(key, key, 2)  # a block layer's KV must name its depth: cache.at(depth, rows)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_exited_token_kv_above_its_depth_is_a_copy_of_its_last_depth(family):
    model = tiny(family)
    force_confident(model)
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(4)
    step(model, ids, cache, num_loops=4)  # prefill: the full budget for every prompt token
    out = step(model, torch.tensor([[7]]), cache, num_loops=4, exit_strategy="threshold", min_loops=2)
    assert out.loop_passes.tolist() == [[2]]
    assert cache.loop_passes.tolist() == [[4] * 6 + [2]]
    for layer_idx in model.config.reasoning_range:
        last = {d: cache.layers[cache.slot(layer_idx, d)] for d in range(4)}
        for d in (2, 3):  # depths the token never ran hold its depth-1 (second pass) entry
            assert torch.equal(last[d].keys[..., -1, :], last[1].keys[..., -1, :])
            assert torch.equal(last[d].values[..., -1, :], last[1].values[..., -1, :])
        assert not torch.equal(last[0].keys[..., -1, :], last[1].keys[..., -1, :])
        # earlier tokens keep their own per-depth entries
        assert not torch.equal(last[3].keys[..., :-1, :], last[1].keys[..., :-1, :])
    # every slot still holds every position
    assert {layer.get_seq_length() for layer in cache.layers if not layer.is_sliding} == {7}


def test_exit_at_depth_d_everywhere_equals_a_fixed_budget_of_d():
    """If every token (prompt included, prefill_exit) exits after d passes, the copies above d are never
    read by a deeper pass, so the result is exactly the fixed budget d."""
    model = tiny("qwen3")
    force_confident(model)
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        adaptive = model.generate(
            ids, num_loops=5, exit_strategy="threshold", min_loops=2, prefill_exit=True, **kwargs
        )
        fixed = model.generate(ids, num_loops=2, **kwargs)
    assert torch.equal(adaptive.sequences, fixed.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(adaptive.logits, fixed.logits)) < 1e-5
    assert output_cache(adaptive).loop_stats()["histogram"] == {2: adaptive.sequences.shape[1] - 1}


def test_shared_mode_keeps_the_latest_depth_and_its_bytes_do_not_depend_on_the_budget():
    model = tiny("gemma3_text")
    ids = torch.randint(3, 97, (1, 7), generator=torch.Generator().manual_seed(3))
    shared_bytes, depth_bytes = {}, {}
    for budget in (1, 2, 4, 8):
        for mode, store in (("shared", shared_bytes), ("per_depth", depth_bytes)):
            cache = model.new_cache(budget, mode)
            step(model, ids, cache, num_loops=budget)  # prefill
            step(model, ids[:, :1], cache, num_loops=budget)  # and decode steps
            step(model, ids[:, :1], cache, num_loops=budget, exit_strategy="kl", exit_threshold=1e9)
            assert cache.get_seq_length() == 9
            store[budget] = cache.kv_bytes()
    assert len(set(shared_bytes.values())) == 1
    assert shared_bytes[1] == depth_bytes[1]
    # per-depth grows by one reasoning block's KV per extra depth
    per_extra = (depth_bytes[2] - depth_bytes[1])
    assert per_extra > 0 and depth_bytes[8] - depth_bytes[1] == 7 * per_extra


def test_shared_slot_holds_the_kv_of_the_last_pass():
    """In shared mode a token's entry after a forward of d passes is its depth-d entry in per_depth mode."""
    model = tiny("llama")
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(4))
    per_depth, shared = model.new_cache(3), model.new_cache(3, "shared")
    step(model, ids, per_depth, num_loops=3)
    step(model, ids, shared, num_loops=3)  # no cached tokens yet: prefill is the same computation
    for layer_idx in model.config.reasoning_range:
        assert torch.allclose(
            shared.layers[shared.slot(layer_idx)].keys, per_depth.layers[per_depth.slot(layer_idx, 2)].keys,
            atol=1e-6,
        )
    force_confident(model)
    step(model, torch.tensor([[9]]), shared, num_loops=3, exit_strategy="threshold", min_loops=1)
    assert shared.get_seq_length() == 6 and shared.loop_passes[0, -1] == 1


def test_prefill_runs_the_full_budget_unless_prefill_exit():
    model = tiny("mistral")
    force_confident(model)
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    fixed = step(model, ids, model.new_cache(4), attention_mask=mask, num_loops=4,
                 exit_strategy="threshold", min_loops=2)
    assert (fixed.loop_passes == 4).all()
    per_seq = step(model, ids, model.new_cache(4), attention_mask=mask, num_loops=4,
                   exit_strategy="threshold", min_loops=2, prefill_exit=True)
    assert (per_seq.loop_passes == 2).all()
    force_confident(model, confident=False)
    never = step(model, ids, model.new_cache(4), attention_mask=mask, num_loops=4,
                 exit_strategy="threshold", min_loops=2, prefill_exit=True)
    assert (never.loop_passes == 4).all()


def test_prefill_exit_is_per_sequence_and_ignores_padding():
    """Convergence exit on the prompt: a row stops when all its real tokens converged; rows differ."""
    model = tiny("llama", num_loops=6)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 97, (4, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[3, :2] = 0
    out = step(model, ids, model.new_cache(6), attention_mask=mask, num_loops=6,
               exit_strategy="convergence", exit_threshold=0.3, prefill_exit=True)
    passes = out.loop_passes
    assert (passes == passes[:, :1]).all()  # one count per sequence
    assert len(set(passes[:, 0].tolist())) > 1  # and sequences differ
    alone = step(model, ids[3:, 2:], model.new_cache(6), num_loops=6,
                 exit_strategy="convergence", exit_threshold=0.3, prefill_exit=True)
    assert alone.loop_passes[0, 0] == passes[3, 0]
    assert torch.allclose(alone.logits[0], out.logits[3, 2:], atol=1e-5)


def test_crop_reorder_select_and_reset_keep_loop_passes_aligned():
    model = tiny("llama")
    ids = torch.randint(3, 97, (3, 4), generator=torch.Generator().manual_seed(7))
    cache = model.new_cache(2)
    step(model, ids, cache, num_loops=2)
    step(model, ids[:, :1], cache, num_loops=1)
    assert cache.get_seq_length() == 5 and cache.loop_passes.shape == (3, 5)
    assert cache.loop_passes[:, -1].tolist() == [1, 1, 1]
    cache.crop(-1)
    assert cache.get_seq_length() == 4 and cache.loop_passes.shape == (3, 4)
    keys = cache.layers[cache.slot(3, 1)].keys.clone()
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(cache.layers[cache.slot(3, 1)].keys, keys[[2, 0, 1]])
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache.loop_passes.shape == (2, 4) and cache.layers[0].keys.shape[0] == 2
    cache.batch_repeat_interleave(2)
    assert cache.loop_passes.shape == (4, 4)
    stats = cache.loop_stats()
    assert stats["mean"] == 2.0 and stats["histogram"] == {2: 16}
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.loop_passes is None and cache.kv_bytes() == 0
