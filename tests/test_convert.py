"""Conversion: exactness at one loop for every supported family, the split contract, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_base
from transformers import GPT2Config, GPT2LMHeadModel

import loopus
from loopus import SplitError, UnsupportedArchitectureError


def padded_batch(vocab: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (3, 12))
    mask = torch.ones_like(ids)
    lengths = [12, 7, 3]
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, : 12 - n] = 0
        else:
            mask[row, n:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_one_loop_equals_base(family, side):
    base = tiny_base(family)
    ids, mask = padded_batch(base.config.vocab_size, side if side != "none" else "left")
    if side == "none":
        mask = torch.ones_like(mask)
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
        model = loopus.convert(base, 2, 1)
        got = model(input_ids=ids, attention_mask=mask, num_loops=1).logits
    keep = mask.bool()
    assert (got - expected)[keep].abs().max().item() <= 1e-4


def test_more_loops_change_output_and_report_states(family):
    base = tiny_base(family)
    ids = torch.randint(3, base.config.vocab_size, (2, 9))
    with torch.no_grad():
        model = loopus.convert(base, 1, 2)
        one = model(ids, num_loops=1).logits
        out = model(ids, num_loops=3, output_loop_states=True)
    assert not torch.allclose(one, out.logits)
    assert len(out.loop_hidden_states) == 3
    assert out.loop_confidences.shape == (2, 9, 3)
    assert ((out.loop_confidences > 0) & (out.loop_confidences < 1)).all()
    # the gate acts from loop 2 on: two coefficients, each in (0, 1)
    assert len(out.gate_coefficients) == 2
    for a in out.gate_coefficients:
        assert ((a > 0) & (a < 1)).all()


def test_convert_shares_base_modules_without_copying():
    base = tiny_base("llama")
    model = loopus.convert(base, 2, 2)
    assert model.base is base
    assert model.layers[3] is base.model.layers[3]
    assert model.config.reasoning_range == range(2, 4)


def test_labels_give_the_causal_lm_loss():
    base = tiny_base("qwen3")
    ids = torch.randint(3, base.config.vocab_size, (2, 10))
    with torch.no_grad():
        expected = base(ids, labels=ids).loss
        got = loopus.convert(base, 1, 1)(ids, labels=ids, num_loops=1).loss
    torch.testing.assert_close(got, expected)


def test_gate_is_input_dependent_once_trained():
    base = tiny_base("llama")
    model = loopus.convert(base, 1, 1)
    torch.nn.init.normal_(model.gate.up.weight, std=0.5)
    proposal, previous = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    a = model.gate.coefficient(proposal, previous)
    assert a.std() > 0.01
    assert ((a > 0) & (a < 1)).all()


@pytest.mark.parametrize(
    "encoder, decoder, message",
    [
        (3, 3, "at least 1 layer"),
        (4, 3, "overlap"),
        (7, 0, "out of range"),
        (-1, 1, "out of range"),
        ([0, 1, 9], 1, "outside"),
        ([1, 2], 1, "first 2 layers"),
        (1, [4, 5, 5], "repeats"),
        (1, [3, 4], "last 2 layers"),
    ],
)
def test_bad_splits_are_refused(encoder, decoder, message):
    with pytest.raises(SplitError, match=message):
        loopus.convert(tiny_base("llama"), encoder, decoder)


def test_explicit_index_lists_equal_counts():
    base = tiny_base("llama")
    model = loopus.convert(base, [0, 1], [4, 5])
    assert (model.config.encoder_layers, model.config.decoder_layers) == (2, 2)


def test_num_loops_below_one_is_refused():
    model = loopus.convert(tiny_base("llama"), 1, 1)
    with pytest.raises(ValueError, match="num_loops must be >= 1"):
        model(torch.tensor([[5, 6, 7]]), num_loops=0)


def test_unsupported_architecture_names_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama, qwen2, qwen3, mistral, gemma3_text, phi3"):
        loopus.convert(gpt2, 1, 1)
