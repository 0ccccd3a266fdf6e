"""Per-token adaptive exit: the strategies, the loop-pass counter, and exit that really skips compute."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import tiny_looped

import loopus
from loopus.halting import ExitRule
from loopus.compat import output_cache


tiny = partial(tiny_looped, num_loops=6)


def left_padded(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 97, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return prompts, ids, mask


def generate(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids) if mask is None else mask,
            max_new_tokens=kwargs.pop("max_new_tokens", 8),
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )


class RowCounter:
    """Counts the batch rows that actually enter a reasoning layer, per forward call of the model."""

    def __init__(self, model):
        self.rows: list[int] = []
        self.calls: list[int] = []
        first_reasoning = model.layers[model.config.reasoning_range.start]
        self.handles = [
            first_reasoning.register_forward_pre_hook(self.on_layer, with_kwargs=True),
            model.register_forward_pre_hook(self.on_forward, with_kwargs=True),
        ]

    def on_forward(self, module, args, kwargs):
        self.calls.append(len(self.rows))

    def on_layer(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.rows.append(hidden.shape[0] * hidden.shape[1])

    def per_call(self) -> list[int]:
        bounds = self.calls + [len(self.rows)]
        return [sum(self.rows[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def close(self):
        for h in self.handles:
            h.remove()


def test_exited_rows_do_no_reasoning_work():
    model = tiny("llama", num_loops=6)
    _, ids, mask = left_padded([6, 3, 5, 4], seed=1)
    counter = RowCounter(model)
    out = generate(model, ids, mask, num_loops=6, exit_strategy="convergence", exit_threshold=0.3)
    counter.close()
    cache = output_cache(out)
    prompt = ids.shape[1]
    decode_passes = cache.loop_passes[:, prompt:]  # one column per decode forward
    work = counter.per_call()
    # prefill: every (row, token) runs the full budget
    assert work[0] == 6 * ids.numel()
    # decode: the reasoning layer saw exactly sum(passes) row-tokens, i.e. exited rows were skipped
    assert work[1:] == decode_passes.sum(0).tolist()
    assert decode_passes.min() >= 1 and decode_passes.max() <= 6
    assert len(set(decode_passes.flatten().tolist())) > 1  # the rows really exit at different depths
    assert sum(work[1:]) < 6 * decode_passes.numel()
    stats = cache.loop_stats(start=prompt)
    assert stats["tokens"] == decode_passes.numel()
    assert stats["mean"] == pytest.approx(decode_passes.float().mean().item())
    assert sum(stats["histogram"].values()) == decode_passes.numel()


@pytest.mark.parametrize(
    "family, strategy, threshold",
    [("llama", "convergence", 0.3), ("phi3", "convergence", 0.3), ("gemma3_text", "kl", 3e-4), ("llama", "kl", 3e-4)],
)
def test_adaptive_batch_rows_equal_prompts_alone(family, strategy, threshold):
    """With per-row exit and the 'latest depth' KV rule a row's result does not depend on its neighbours."""
    model = tiny(family, num_loops=5)
    prompts, ids, mask = left_padded([7, 3, 5], seed=2)
    kwargs = dict(num_loops=5, exit_strategy=strategy, exit_threshold=threshold)
    batch = generate(model, ids, mask, **kwargs)
    width = ids.shape[1]
    passes_seen = set()
    for row, p in enumerate(prompts):
        alone = generate(model, p[None], **kwargs)
        assert torch.equal(batch.sequences[row, width:], alone.sequences[0, len(p) :])
        gap = max((b[row] - a[0]).abs().max().item() for b, a in zip(batch.logits, alone.logits))
        assert gap < 1e-4
        assert torch.equal(output_cache(batch).loop_passes[row, width:], output_cache(alone).loop_passes[0, len(p) :])
        passes_seen |= set(output_cache(alone).loop_passes[0, len(p) :].tolist())
    assert len(passes_seen) > 1


def test_a_rule_that_never_fires_equals_the_fixed_budget():
    model = tiny("qwen2", num_loops=4)
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    fixed = generate(model, ids, num_loops=4, max_new_tokens=5)
    for strategy in ("convergence", "kl"):
        never = generate(model, ids, num_loops=4, exit_strategy=strategy, exit_threshold=0.0, max_new_tokens=5)
        assert torch.equal(never.sequences, fixed.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(never.logits, fixed.logits)) == 0.0
        assert (output_cache(never).loop_passes == 4).all()
    pinned = generate(model, ids, num_loops=4, exit_strategy="convergence", exit_threshold=10.0, min_loops=4,
                      max_new_tokens=5)
    assert torch.equal(pinned.sequences, fixed.sequences)


def test_confidence_strategies_at_initialisation():
    """The untrained head says 0.5 everywhere: `threshold` 0.5 exits at min_loops, `cdf` 0.9 after 4 passes
    (1 - 0.5**4 = 0.94), `threshold` 0.9 never."""
    model = tiny("llama", num_loops=6)
    ids = torch.randint(3, 97, (1, 4), generator=torch.Generator().manual_seed(4))
    prompt = ids.shape[1]
    half = generate(model, ids, num_loops=6, exit_strategy="threshold", exit_threshold=0.5, min_loops=3)
    assert output_cache(half).loop_stats(start=prompt)["histogram"] == {3: 7}
    cdf = generate(model, ids, num_loops=6, exit_strategy="cdf", exit_threshold=0.9)
    assert output_cache(cdf).loop_stats(start=prompt)["histogram"] == {4: 7}
    high = generate(model, ids, num_loops=6, exit_strategy="threshold", exit_threshold=0.9)
    assert output_cache(high).loop_stats(start=prompt)["histogram"] == {6: 7}


def test_kl_needs_two_passes_and_a_loose_threshold_stops_there():
    model = tiny("gemma3_text", num_loops=5)
    ids = torch.randint(3, 97, (1, 4), generator=torch.Generator().manual_seed(5))
    out = generate(model, ids, num_loops=5, exit_strategy="kl", exit_threshold=1e9)
    assert output_cache(out).loop_stats(start=4)["histogram"] == {2: 7}
    later = generate(model, ids, num_loops=5, exit_strategy="kl", exit_threshold=1e9, min_loops=3)
    assert output_cache(later).loop_stats(start=4)["histogram"] == {3: 7}


def test_kl_probe_writes_nothing_to_the_decoder_cache():
    model = tiny("mistral", num_loops=4)
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(6))
    out = generate(model, ids, num_loops=4, exit_strategy="kl", exit_threshold=0.01, max_new_tokens=4)
    cache = output_cache(out)
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    decoder_slot = cache.slot(model.config.reasoning_range.stop)
    assert cache.layers[decoder_slot].get_seq_length() == cache.get_seq_length()


def test_forward_reports_loop_passes_and_per_loop_records_under_exit():
    model = tiny("llama", num_loops=5)
    ids = torch.randint(3, 97, (3, 1), generator=torch.Generator().manual_seed(7))
    cache = model.new_cache(5)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 97, (3, 4)), past_key_values=cache, num_loops=5)
        out = model(input_ids=ids, past_key_values=cache, num_loops=5, exit_strategy="convergence",
                    exit_threshold=0.3, output_loop_states=True)
    passes = out.loop_passes[:, 0]
    assert out.loop_passes.shape == (3, 1)
    assert len(out.loop_hidden_states) == int(passes.max())
    for row, n in enumerate(passes.tolist()):  # a row that exited keeps its state, with gate share 0
        for t in range(n, len(out.loop_hidden_states)):
            assert torch.equal(out.loop_hidden_states[t][row], out.loop_hidden_states[n - 1][row])
            assert (out.gate_coefficients[t - 1][row] == 0).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (("median", None, None, 4), "unknown exit_strategy"),
        (("cdf", 0.0, None, 4), "probability in"),
        (("kl", -1.0, None, 4), "must be >= 0"),
        (("kl", None, 5, 4), "larger than the budget"),
    ],
)
def test_exit_rule_validation(args, message):
    with pytest.raises(ValueError, match=message):
        ExitRule.build(*args)
    rule = ExitRule.build("kl", None, None, 4)
    assert (rule.threshold, rule.min_loops, rule.num_loops) == (0.01, 1, 4)


def test_a_one_token_prompt_is_prefill_alone_and_in_a_padded_batch():
    """A one-token prompt is prefill, not a decode step: the full budget, alone exactly as in a batch."""
    model = tiny("llama", num_loops=6)
    prompts, ids, mask = left_padded([1, 4, 1, 3], seed=9)
    kwargs = dict(num_loops=6, exit_strategy="convergence", exit_threshold=0.3, max_new_tokens=6)
    batch = generate(model, ids, mask, **kwargs)
    width = ids.shape[1]
    for row, p in enumerate(prompts):
        alone = generate(model, p[None], **kwargs)
        assert (output_cache(alone).loop_passes[0, : len(p)] == 6).all()  # the prompt ran the whole budget
        assert torch.equal(batch.sequences[row, width:], alone.sequences[0, len(p) :])
        assert torch.equal(output_cache(batch).loop_passes[row, width:], output_cache(alone).loop_passes[0, len(p) :])
    assert set(output_cache(batch).loop_passes[:, width:].flatten().tolist()) != {6}  # decode steps do exit


def test_exit_where_it_could_never_apply_is_refused():
    model = tiny("llama", num_loops=4)
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="use_cache=False"):
        generate(model, ids, num_loops=4, exit_strategy="kl", exit_threshold=0.1, use_cache=False)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        generate(model, ids, num_loops=4, exit_strategy="kl", exit_threshold=0.1, prompt_lookup_num_tokens=2)
    with torch.no_grad(), pytest.raises(ValueError, match="no KV cache"):
        model(input_ids=ids, num_loops=4, exit_strategy="kl", exit_threshold=0.1, use_cache=False)
    with torch.no_grad():  # the same forward with prefill_exit applies the rule
        model(input_ids=ids, num_loops=4, exit_strategy="kl", exit_threshold=0.1, use_cache=False, prefill_exit=True)
