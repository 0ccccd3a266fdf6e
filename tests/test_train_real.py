"""Random deep supervision on the real embedded Gemma 3 270M and real enwiki text."""

from __future__ import annotations

import copy

import pytest
import torch

import loopus
from loopus.train.data import build_data
from loopus.train.evaluation import evaluate
from loopus.train.objective import RDSConfig, RDSPlan, rds_step
from loopus.train.optim import build_optimizer
from loopus.train.params import apply_freeze

pytestmark = pytest.mark.real


def test_two_rds_steps_reduce_the_loss_on_real_text(gemma, data_dir):
    torch.set_num_threads(1)
    base, tokenizer = gemma
    # a private copy: the session fixture is shared with other tests and must stay the pretrained model
    model = loopus.convert(copy.deepcopy(base), 4, 2).train()
    trains = apply_freeze(model, {"embeddings", "encoder"})
    assert not trains["base.model.embed_tokens.weight"]  # tied head frozen with the embeddings
    data = build_data(tokenizer, ["enwiki"], str(data_dir), seq_len=48, train_rows=1, valid_rows=1)
    inputs, labels = data.batch(0, 1)
    before = evaluate(model, [(inputs, labels)], [1, 2], RDSConfig(ce_chunk=64))
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95))
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        metrics = rds_step(model, inputs, labels, RDSPlan(2, (1, 2)), RDSConfig(ce_chunk=64))
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
        optimizer.step()
    after = evaluate(model, [(inputs, labels)], [1, 2], RDSConfig(ce_chunk=64))
    assert 1.0 < before["1"]["loss"] < 8.0  # a pretrained model on real text
    assert after["2"]["loss"] < before["2"]["loss"] - 0.05
    assert after["1"]["loss"] < before["1"]["loss"]


def test_the_iterate_recipe_trains_its_injection_on_real_text(gemma, data_dir):
    torch.set_num_threads(1)
    base, tokenizer = gemma
    from loopus.train.recipes import ITERATE

    model = loopus.convert(copy.deepcopy(base), 7, 8, gate_init=ITERATE["gate_init"],
                           gate_floor=ITERATE["gate_floor"], input_injection=True).train()
    apply_freeze(model, {"embeddings"})
    data = build_data(tokenizer, ["enwiki"], str(data_dir), seq_len=48, train_rows=1, valid_rows=1)
    inputs, labels = data.batch(0, 1)
    with torch.no_grad():
        assert torch.equal(model(inputs, num_loops=1, use_cache=False).logits, base(inputs).logits)
    before = evaluate(model, [(inputs, labels)], [1, 6], RDSConfig(ce_chunk=64))
    assert abs(before["6"]["loss"] / before["1"]["loss"] - 1) < 0.005  # function preserving at 6 loops
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95), new_module_lr_mult=100.0)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        rds_step(model, inputs, labels, RDSPlan(6, (1, 6), grad_steps=ITERATE["grad_steps"]), RDSConfig(ce_chunk=64))
        assert model.injection.weight.grad is not None and model.injection.weight.grad.abs().sum() > 0
        optimizer.step()
    after = evaluate(model, [(inputs, labels)], [1, 6], RDSConfig(ce_chunk=64))
    assert after["6"]["loss"] < before["6"]["loss"] - 0.05
