"""The RDS objective: plans, chunked cross entropy, confidence targets, gradients, flat memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loopus.train.objective import (
    RDSConfig,
    RDSPlan,
    chunked_cross_entropy,
    confidence_targets,
    dense_step,
    rds_step,
    sample_plan,
)
from loopus.train.params import apply_freeze, apply_lora, enable_gradient_checkpointing, parameter_groups
from conftest import tiny_base
from test_train_helpers import tiny_loopus

torch.set_num_threads(1)


def batch(seed=0, b=2, s=12, vocab=97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :3] = -100
    return ids[:, :-1], labels


def test_sample_plan_respects_ranges_and_is_reproducible():
    seen_horizons, seen_counts = set(), set()
    for seed in range(200):
        plan = sample_plan(torch.Generator().manual_seed(seed), RDSConfig(3, 7, 1, 3, supervise_first=False))
        again = sample_plan(torch.Generator().manual_seed(seed), RDSConfig(3, 7, 1, 3, supervise_first=False))
        assert plan == again
        assert 3 <= plan.horizon <= 7 and 1 <= len(plan.supervised) <= 3
        assert plan.supervised[-1] == plan.horizon  # supervise_last
        assert all(1 <= t <= plan.horizon for t in plan.supervised)
        seen_horizons.add(plan.horizon)
        seen_counts.add(len(plan.supervised))
    assert seen_horizons == set(range(3, 8)) and seen_counts == {1, 2, 3}


def test_supervise_first_always_includes_loop_one_and_leaves_the_default_draws_alone():
    middle = set()
    for seed in range(200):
        plan = sample_plan(torch.Generator().manual_seed(seed), RDSConfig(2, 6, 2, 3, supervise_first=True))
        assert plan.supervised[0] == 1 and plan.supervised[-1] == plan.horizon
        middle |= set(plan.supervised[1:-1])
        # without the option the draw is the one the earlier releases made (resume of old runs stays exact)
        default = sample_plan(torch.Generator().manual_seed(seed), RDSConfig(2, 6, 2, 3, supervise_first=False))
        g = torch.Generator().manual_seed(seed)
        horizon = int(torch.randint(2, 7, (1,), generator=g))
        count = min(int(torch.randint(2, 4, (1,), generator=g)), horizon)
        rest = torch.randperm(horizon - 1, generator=g)[: count - 1] + 1
        assert default.supervised == tuple(sorted({horizon, *rest.tolist()}))
    assert middle == {2, 3, 4, 5}  # the remaining draws still cover the inner steps


def test_gradient_windows_never_overlap():
    plan = RDSPlan(8, (3, 4, 8), grad_steps=2)
    assert plan.window_starts() == {3: 2, 4: 4, 8: 7}
    assert plan.grad_mask() == [False, True, True, True, False, False, True, True]
    with pytest.raises(ValueError):
        RDSPlan(4, (5,))


def test_chunked_cross_entropy_matches_full_and_caps_live_logits():
    model = tiny_loopus("gemma3_text")
    ids, labels = batch(s=20)
    hidden = model.decode(model.encode(model.get_input_embeddings()(ids), ctx := model.layer_context(
        model.get_input_embeddings()(ids), None, None, None)), ctx)
    widest = []

    def logits_fn(h):
        widest.append(h.shape[0])
        return model.lm_logits(h)

    ce = chunked_cross_entropy(hidden, labels, logits_fn, chunk=7)
    full = F.cross_entropy(model.lm_logits(hidden).flatten(0, 1).float(), labels.flatten(), reduction="sum")
    assert max(widest) <= 7 and len(widest) >= 5
    assert torch.allclose(ce.loss_sum, full, rtol=1e-5)
    assert ce.count == int((labels != -100).sum())
    (g_chunked,) = torch.autograd.grad(ce.loss_sum, hidden, retain_graph=True)
    (g_full,) = torch.autograd.grad(full, hidden)
    assert torch.allclose(g_chunked, g_full, atol=1e-5)
    # the backward recomputes one chunk at a time too
    assert max(widest) <= 7


def test_confidence_target_means_exit_changes_nothing():
    nll = torch.tensor([1.0, 1.0, 3.0, 0.5])
    pred = torch.tensor([5, 5, 7, 2])
    ref_nll = torch.tensor([1.0, 0.5, 3.0, 0.5])
    ref_pred = torch.tensor([5, 5, 7, 3])
    # same token and no loss: 1; same token but 0.5 nats worse: 0; hopeless at every depth yet settled: 1;
    # a different emitted token: 0
    assert confidence_targets(nll, pred, ref_nll, ref_pred, margin=0.1).tolist() == [1.0, 0.0, 1.0, 0.0]


def test_gradient_reaches_exactly_the_trainable_parameters():
    model = tiny_loopus("llama", encoder=2, decoder=1)
    trains = apply_freeze(model, {"embeddings", "encoder"})
    groups = parameter_groups(model)
    ids, labels = batch()
    rds_step(model, ids, labels, RDSPlan(3, (1, 3)), RDSConfig(lambda_conf=1.0))
    for name, p in model.named_parameters():
        if trains[name]:
            assert p.grad is not None, f"{name} ({groups[name]}) got no gradient"
            # the gate's up-projection starts at zero, so its down-projection's gradient is exactly 0 at init
            if name != "gate.down.weight":
                assert p.grad.abs().sum() > 0, f"{name} ({groups[name]}) got a zero gradient"
        else:
            assert p.grad is None, f"frozen {name} ({groups[name]}) got a gradient"
    assert {groups[n] for n, t in trains.items() if t} == {"reasoning", "gate", "decoder", "head", "confidence"}
    assert {groups[n] for n, t in trains.items() if not t} == {"embeddings", "encoder"}


def test_tied_head_follows_the_embeddings_and_freezing_more_stops_gradients():
    model = tiny_loopus("gemma3_text")  # tied lm_head
    trains = apply_freeze(model, {"embeddings", "encoder", "reasoning", "gate"})
    assert not trains["base.model.embed_tokens.weight"]
    ids, labels = batch()
    rds_step(model, ids, labels, RDSPlan(2, (1, 2)))
    groups = parameter_groups(model)
    got = {groups[n] for n, p in model.named_parameters() if p.grad is not None}
    assert got == {"decoder", "confidence"}


def test_encoder_trains_through_the_first_supervised_step_when_unfrozen():
    model = tiny_loopus("llama", encoder=2, decoder=1)
    apply_freeze(model, {"embeddings"})
    ids, labels = batch()
    rds_step(model, ids, labels, RDSPlan(3, (1, 3)))
    encoder = [p for layer in model.layers[:2] for p in layer.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder)
    assert model.base.model.embed_tokens.weight.grad is None
    # without loop 1 supervised, every gradient window starts on a detached state: nothing reaches the encoder
    model.zero_grad(set_to_none=True)
    rds_step(model, ids, labels, RDSPlan(3, (2, 3)))
    assert all(p.grad is None or not p.grad.any() for p in encoder)
    assert model.layers[2].mlp.down_proj.weight.grad.abs().sum() > 0


def _graph_bytes_per_backward(model, plan):
    """Bytes saved for backward between consecutive backward() calls (= one supervised step's graph)."""
    segments, current = [], [0]

    def pack(t):
        current[0] += t.numel() * t.element_size()
        return t

    def backward(loss):
        segments.append(current[0])
        current[0] = 0
        loss.backward()

    ids, labels = batch(s=16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rds_step(model, ids, labels, plan, RDSConfig(lambda_conf=0.0), backward=backward)
    return segments


def test_graph_size_does_not_grow_with_the_horizon_but_bptt_does():
    model = tiny_loopus("llama", encoder=1, decoder=1)
    apply_freeze(model, {"embeddings", "encoder"})
    short = _graph_bytes_per_backward(model, RDSPlan(4, (2, 4)))
    long = _graph_bytes_per_backward(model, RDSPlan(32, (16, 32)))
    assert len(short) == len(long) == 2
    assert max(long) == max(short)
    bptt_short = _graph_bytes_per_backward(model, RDSPlan(4, (4,), grad_steps=4))
    bptt_long = _graph_bytes_per_backward(model, RDSPlan(16, (16,), grad_steps=16))
    assert bptt_long[0] > 3 * bptt_short[0]


def test_backward_runs_once_per_supervised_step_plus_the_confidence_loss():
    model = tiny_loopus("llama")
    apply_freeze(model, {"embeddings", "encoder"})
    calls = []
    ids, labels = batch()
    metrics = rds_step(model, ids, labels, RDSPlan(5, (2, 3, 5)), backward=lambda l: (calls.append(1), l.backward()))
    assert len(calls) == 4
    assert set(metrics) >= {"lm@2", "lm@3", "lm@5", "mono", "conf", "conf_target", "lm"}


def _mlp_calls(model, layer_index, fn):
    count = [0]
    # a pre-hook: non-reentrant recomputation stops early, before the forward hooks of the last module
    handle = model.layers[layer_index].mlp.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    fn()
    handle.remove()
    return count[0]


def test_gradient_checkpointing_really_recomputes():
    ids, labels = batch()
    plan = RDSPlan(3, (2, 3))
    grads = []
    calls = []
    for checkpointing in (False, True):
        model = tiny_loopus("llama", encoder=1, decoder=1)
        apply_freeze(model, {"embeddings", "encoder"})
        if checkpointing:
            enable_gradient_checkpointing(model)
        calls.append(_mlp_calls(model, 2, lambda: rds_step(model, ids, labels, plan)))
        grads.append(model.layers[2].mlp.up_proj.weight.grad.clone())
    # 3 loop steps forward; with checkpointing the 2 steps with gradient are recomputed in the backward
    assert calls == [3, 5]
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_dense_step_trains_the_unlooped_base():
    base = tiny_base("qwen3").train()
    apply_freeze(base, {"embeddings"})
    ids, labels = batch()
    metrics = dense_step(base, ids, labels, ce_chunk=5)
    assert metrics["lm"] > 0
    assert base.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert base.model.embed_tokens.weight.grad is None


def test_lora_trains_adapters_gate_and_confidence_only():
    model = tiny_loopus("llama", encoder=1, decoder=1)
    apply_freeze(model, {"embeddings", "encoder"})
    peft_model = apply_lora(model, {"embeddings", "encoder"}, rank=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".gate." in n or "confidence_head" in n for n in trainable)
    assert not any("layers.0." in n for n in trainable)  # the frozen encoder gets no adapters
    core = peft_model.base_model.model
    ids, labels = batch()
    rds_step(core, ids, labels, RDSPlan(2, (1, 2)))
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None for p in lora_b)


def test_schedule_counts_optimiser_steps_and_tokens_convert_to_steps():
    from loopus.train.config import TrainConfig
    from loopus.train.optim import build_optimizer, build_scheduler, lr_factor

    assert [lr_factor(s, 10, 2, "cosine", 0.1) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 10, 2, "linear", 0.0) == pytest.approx(0.5)
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, 1.0, 0.0, (0.9, 0.95))
    sched = build_scheduler(opt, 10, 2, "cosine", 0.1)
    for step in range(5):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(lr_factor(5, 10, 2, "cosine", 0.1))
    looped = tiny_loopus("llama")
    apply_freeze(looped, {"embeddings", "encoder"})
    opt = build_optimizer(looped, 1e-3, 0.1, (0.9, 0.95), new_module_lr_mult=10.0)
    new = {id(p) for n, p in looped.named_parameters() if n.startswith(("gate.", "confidence_head."))}
    for group in opt.param_groups:
        is_new = {id(p) in new for p in group["params"]}
        assert len(is_new) == 1
        assert group["lr"] == pytest.approx(1e-2 if is_new.pop() else 1e-3)
    cfg = TrainConfig.of(max_tokens=1000, seq_len=16, batch_size=2, grad_accum=3)
    assert cfg.total_steps() == 11 and cfg.total_steps(num_processes=2) == 6
    with pytest.raises(ValueError, match="max-steps"):
        TrainConfig.of()
    with pytest.raises(ValueError, match="freeze"):
        TrainConfig.of(max_steps=1, freeze=["encoderz"])


def test_plan_flops_count_the_weight_gradients_only_where_weights_train():
    """Frozen reasoning and decoder weights (depth adapters train) drop one backward matmul per layer pass
    with a gradient, and nothing else; the supervised-first draw puts loop 1 in every plan."""
    from loopus.train.flops import per_token_costs, plan_flops, rds_step_flops

    config = tiny_base("llama").config
    plan = RDSPlan(3, (1, 3), 1)
    layer, _ = per_token_costs(config, 16)
    reasoning = config.num_hidden_layers - 1 - 1
    saved = plan_flops(config, 16, 1, 1, plan) - plan_flops(config, 16, 1, 1, plan, weights_train=False)
    assert saved == pytest.approx(layer * (reasoning * sum(plan.grad_mask()) + 1 * len(plan.supervised)))
    first = rds_step_flops(config, 16, 1, 1, RDSConfig(2, 4, 2, 2, supervise_first=True), samples=200)
    assert first != rds_step_flops(config, 16, 1, 1, RDSConfig(2, 4, 2, 2, supervise_first=False), samples=200)
