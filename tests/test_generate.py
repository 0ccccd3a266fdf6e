"""`model.generate` with the loop-aware cache: exact vs recomputation, left padding, sampling, beams, bad input."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import tiny_looped

import loopus
from loopus.compat import GENERATION_CACHE_KWARG, output_cache

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3"]


tiny = partial(tiny_looped, num_loops=3)


def gen(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=mask if mask is not None else torch.ones_like(ids),
            do_sample=kwargs.pop("do_sample", False),
            max_new_tokens=kwargs.pop("max_new_tokens", 8),
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )


def max_logit_gap(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_equals_recomputation(family):
    model = tiny(family)
    ids = torch.randint(3, 97, (1, 7), generator=torch.Generator().manual_seed(3))
    cached = gen(model, ids, num_loops=3)
    uncached = gen(model, ids, num_loops=3, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert max_logit_gap(cached, uncached) < 1e-4
    assert isinstance(output_cache(cached), loopus.LoopKVCache)
    # every position (prompt + generated but the last) is cached at every depth
    assert output_cache(cached).get_seq_length() == cached.sequences.shape[1] - 1


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "mistral"])
def test_left_padded_batch_rows_equal_prompts_alone(family):
    model = tiny(family)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 97, (n,), generator=g) for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    batch = gen(model, ids, mask, num_loops=3)
    for row, p in enumerate(prompts):
        alone = gen(model, p[None], num_loops=3)
        assert torch.equal(batch.sequences[row, width:], alone.sequences[0, len(p) :])
        gap = max((b[row] - a[0]).abs().max().item() for b, a in zip(batch.logits, alone.logits))
        assert gap < 1e-4


def test_sampling_with_a_seed_matches_recomputation():
    model = tiny("qwen3")
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    cached = gen(model, ids, do_sample=True, top_k=20, temperature=1.3, num_loops=2)
    torch.manual_seed(11)
    uncached = gen(model, ids, do_sample=True, top_k=20, temperature=1.3, num_loops=2, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)


def test_beam_search_reorders_the_cache():
    model = tiny("llama")
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        kwargs = dict(num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=0, num_loops=3)
        cached = model.generate(ids, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_shared_kv_equals_per_depth_at_one_loop_and_differs_above():
    model = tiny("gemma3_text")
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    one_shared = gen(model, ids, num_loops=1, kv_mode="shared")
    one_depth = gen(model, ids, num_loops=1, kv_mode="per_depth")
    assert torch.equal(one_shared.sequences, one_depth.sequences)
    assert max_logit_gap(one_shared, one_depth) == 0.0
    shared = gen(model, ids, num_loops=4, kv_mode="shared")
    per_depth = gen(model, ids, num_loops=4, kv_mode="per_depth")
    assert output_cache(shared).kv_mode == "shared"
    # the prompt's logits are identical (prefill sees no cached tokens); decoding differs once it reads the cache
    assert torch.allclose(shared.logits[0], per_depth.logits[0], atol=1e-5)
    assert max_logit_gap(shared, per_depth) > 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_loops=3, exit_strategy="fastest"), "unknown exit_strategy 'fastest'"),
        (dict(num_loops=2, exit_strategy="kl", min_loops=3), "min_loops=3 is larger than the budget"),
        (dict(num_loops=2, min_loops=3), "min_loops=3 is larger than the budget"),
        (dict(num_loops=2, exit_strategy="kl", min_loops=0), "min_loops must be >= 1"),
        (dict(num_loops=2, exit_threshold=0.3), "without an exit_strategy"),
        (dict(num_loops=2, exit_strategy="threshold", exit_threshold=1.5), "probability in"),
        (dict(num_loops=2, kv_mode="ring"), "kv_mode must be one of"),
    ],
)
def test_bad_generation_arguments_are_refused(kwargs, message):
    model = tiny("llama")
    with pytest.raises(ValueError, match=message):
        gen(model, torch.tensor([[5, 6, 7]]), **kwargs)


def test_a_cache_built_for_fewer_loops_is_refused():
    model = tiny("llama")
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="built for 2 loops but num_loops=4"):
        gen(model, torch.tensor([[5, 6, 7]]), num_loops=4, **{GENERATION_CACHE_KWARG: cache})
    with pytest.raises(ValueError, match="kv_mode='shared' was requested"):
        gen(model, torch.tensor([[5, 6, 7]]), num_loops=2, **{GENERATION_CACHE_KWARG: model.new_cache(2)}, kv_mode="shared")


def test_a_budget_below_the_cache_depth_is_allowed_and_exact():
    """A cache built for 4 loops serves a 2-loop generation; the unused depths hold copies (see cache.py)."""
    model = tiny("qwen2")
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(8))
    reference = gen(model, ids, num_loops=2)
    cache = model.new_cache(4)
    got = gen(model, ids, num_loops=2, **{GENERATION_CACHE_KWARG: cache})
    assert torch.equal(got.sequences, reference.sequences)
    assert max_logit_gap(got, reference) < 1e-5
    for layer_idx in model.config.reasoning_range:
        deep = cache.layers[cache.slot(layer_idx, 3)]
        assert torch.equal(deep.keys, cache.layers[cache.slot(layer_idx, 1)].keys)
