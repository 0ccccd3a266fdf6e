"""Function-preserving loops: near-identity gates, depth-wise adapters (loop 2 on) and the KL-to-base term."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import loopus
from loopus.train import Runtime, TrainConfig, Trainer, resolve
from loopus.train.objective import RDSConfig, RDSPlan, rds_step
from loopus.train.recipes import DEFAULT, FROZEN_BASE_FREEZE, FULL_WEIGHT_FREEZE
from conftest import char_tokenizer, tiny_base
from test_train_helpers import write_corpus

torch.set_num_threads(1)
IDS = torch.randint(4, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def logits(model, num_loops: int) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, num_loops=num_loops, use_cache=False).logits


def drift(model, loops: int = 8) -> float:
    """Largest change of the logits between one loop and `loops` loops."""
    return (logits(model, loops) - logits(model, 1)).abs().max().item()


def test_a_near_identity_gate_keeps_every_loop_count_near_the_base(family):
    # the gate's share of the new state bounds how far extra loops move the model at initialisation
    preserving = loopus.convert(tiny_base(family), 2, 1, gate_init=0.005).eval()
    default = loopus.convert(tiny_base(family), 2, 1, gate_init=0.5).eval()
    assert torch.equal(logits(preserving, 1), tiny_base(family)(IDS).logits.detach())
    assert drift(preserving) < drift(default) / 20


def test_depth_adapters_at_initialisation_change_no_loop_count(family):
    plain = loopus.convert(tiny_base(family), 2, 1, gate_init=0.02).eval()
    adapted = loopus.convert(tiny_base(family), 2, 1, gate_init=0.02, depth_lora_rank=4).eval()
    adapted.gate.load_state_dict(plain.gate.state_dict())  # PEFT's init drew from the RNG before the gate's
    assert adapted.depth_adapter_parameters()
    for n in (1, 2, 5):
        assert torch.equal(logits(adapted, n), logits(plain, n))


def perturbed_adapters(family: str):
    model = loopus.convert(tiny_base(family), 2, 1, depth_lora_rank=4).eval()
    torch.manual_seed(1)
    for p in model.depth_adapter_parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


def test_depth_adapters_act_from_loop_two_only(family):
    model = perturbed_adapters(family)
    plain = loopus.convert(tiny_base(family), 2, 1).eval()
    plain.gate.load_state_dict(model.gate.state_dict())
    assert torch.equal(logits(model, 1), tiny_base(family)(IDS).logits.detach())
    assert (logits(model, 3) - logits(plain, 3)).abs().max() > 1e-3


def test_depth_adapters_survive_save_and_load(tmp_path):
    model = perturbed_adapters("gemma3_text")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.depth_lora_rank == 4
    for n in (1, 3):
        assert torch.equal(logits(loaded, n), logits(model, n))


def test_depth_adapters_decode_with_the_cache_as_without(family):
    model = perturbed_adapters(family)
    model.generation_config.eos_token_id = None
    out = model.generate(IDS[:1], max_new_tokens=5, num_loops=3, do_sample=False)
    with torch.no_grad():
        full = model(out[:, :-1], num_loops=3, use_cache=False).logits
    assert torch.equal(full[0, IDS.shape[1] - 1 :].argmax(-1), out[0, IDS.shape[1] :])


def test_per_loop_adapters_give_each_depth_its_own_update(family):
    """depth_lora_count=2: loop 2 runs adapter `depth`, loops 3 on run `depth_3`; one loop stays the base."""
    shared = perturbed_adapters(family)
    per_loop = loopus.convert(tiny_base(family), 2, 1, depth_lora_rank=4, depth_lora_count=2).eval()
    per_loop.gate.load_state_dict(shared.gate.state_dict())
    own = {n: p for n, p in per_loop.named_parameters() if ".depth." in n}
    assert own and all(n.replace(".depth.", ".depth_3.") in dict(per_loop.named_parameters()) for n in own)
    with torch.no_grad():
        for n, p in shared.named_parameters():
            if ".depth." in n:
                own[n].copy_(p)  # `depth` equal to the shared model's; `depth_3` still zero (B = 0)
    assert torch.equal(logits(per_loop, 1), tiny_base(family)(IDS).logits.detach())
    assert torch.equal(logits(per_loop, 2), logits(shared, 2))
    assert (logits(per_loop, 3) - logits(shared, 3)).abs().max() > 1e-3
    assert len(per_loop.depth_adapter_parameters()) == 2 * len(shared.depth_adapter_parameters())


def test_per_loop_adapters_survive_save_and_load_and_decode_with_the_cache(tmp_path):
    model = loopus.convert(tiny_base("gemma3_text"), 2, 1, depth_lora_rank=4, depth_lora_count=3).eval()
    torch.manual_seed(1)
    for p in model.depth_adapter_parameters():
        torch.nn.init.normal_(p, std=0.3)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.depth_lora_count == 3
    for n in (1, 3, 5):
        assert torch.equal(logits(loaded, n), logits(model, n))
    model.generation_config.eos_token_id = None
    out = model.generate(IDS[:1], max_new_tokens=5, num_loops=4, do_sample=False)
    with torch.no_grad():
        full = model(out[:, :-1], num_loops=4, use_cache=False).logits
    assert torch.equal(full[0, IDS.shape[1] - 1 :].argmax(-1), out[0, IDS.shape[1] :])


def test_the_gradient_reaches_every_per_loop_adapter_in_one_window():
    """Switching the active adapter between loops must not cut the gradient of the one used before."""
    model = loopus.convert(tiny_base("llama").train(), 2, 1, depth_lora_rank=4, depth_lora_count=2)
    model.requires_grad_(False)
    for p in model.depth_adapter_parameters():
        p.requires_grad_(True)
    ids = torch.randint(4, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    rds_step(model, ids, ids.roll(-1, 1), RDSPlan(3, (1, 3), grad_steps=2), RDSConfig(lambda_conf=0.0))
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    for name in ("depth", "depth_3"):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if f".{name}." in n), name
    assert all(p.requires_grad for p in model.depth_adapter_parameters())


def test_depth_adapters_refuse_a_second_set():
    model = loopus.convert(tiny_base("llama"), 2, 1, depth_lora_rank=4)
    with pytest.raises(ValueError, match="already has depth adapters"):
        model.add_depth_adapters(8)


DEFAULT_DEPTH_LORA_RANK = DEFAULT["depth_lora_rank"]


def train_tiny(tmp_path, family: str, **options) -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny converted model trained 8 steps with `options` over the defaults; (trained model, 3-loop logits before)."""
    write_corpus(tmp_path / "data")
    cfg = TrainConfig.of(model="unused", out=str(tmp_path / "run"), data=str(tmp_path / "data"), corpus=["tiny"],
                         seq_len=16, batch_size=2, max_steps=8, lr=1e-2, horizon_min=2, horizon_max=3,
                         eval_at_start=False, eval_at_end=False, progress=False, tensorboard=False, **options)
    assert resolve(cfg, Runtime()).build.depth_lora_rank == DEFAULT_DEPTH_LORA_RANK > 0
    model = loopus.convert(tiny_base(family).train(), 2, 1, gate_init=0.1)
    before = logits(model, 3)
    Trainer(cfg, model=model, tokenizer=char_tokenizer()).train()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if "lora_B" in n)
    return trained, before


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_depth_adapters_on_a_frozen_base_keep_one_loop_exactly_the_base_after_training(tmp_path, family):
    """The frozen-base option (FROZEN_BASE_FREEZE): depth-wise adapters, gate and head train, nothing else."""
    trained, before = train_tiny(tmp_path, family, freeze=FROZEN_BASE_FREEZE)
    assert torch.equal(logits(trained, 1), tiny_base(family)(IDS).logits.detach())
    assert (logits(trained, 3) - before).abs().max() > 1e-4


def test_per_loop_adapters_on_a_frozen_base_train_each_and_keep_one_loop_the_base(tmp_path):
    trained, _ = train_tiny(tmp_path, "llama", freeze=FROZEN_BASE_FREEZE, depth_lora_count=2)
    assert trained.config.depth_lora_count == 2
    assert torch.equal(logits(trained, 1), tiny_base("llama")(IDS).logits.detach())
    for name in ("depth", "depth_3"):
        assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if f"lora_B.{name}." in n), name


def test_the_default_recipe_trains_the_shared_weights_and_the_depth_adapters(tmp_path):
    """The default (nothing about the recipe set here): the layers from the encoder's end on train too, so
    one loop moves like the dense baseline, while the frozen encoder layers keep their weights."""
    trained, _ = train_tiny(tmp_path, "llama")
    base = tiny_base("llama")
    assert (logits(trained, 1) - base(IDS).logits.detach()).abs().max() > 1e-4
    assert torch.equal(trained.layers[0].mlp.down_proj.weight, base.model.layers[0].mlp.down_proj.weight)
    assert not torch.equal(trained.layers[-1].mlp.down_proj.weight, base.model.layers[-1].mlp.down_proj.weight)


def test_the_default_recipe_drops_depth_adapters_where_they_cannot_run():
    default = resolve(TrainConfig.of(max_steps=1), Runtime())
    assert default.build.depth_lora_rank == DEFAULT_DEPTH_LORA_RANK and default.build.freeze == FULL_WEIGHT_FREEZE
    for options in ({"mode": "dense"}, {"lora_rank": 4}, {"fsdp": True}, {"gradient_checkpointing": True},
                    {"depth_lora_rank": 0}):
        full = resolve(TrainConfig.of(max_steps=1, **options), Runtime())
        assert full.build.depth_lora_rank == 0 and full.build.freeze == FULL_WEIGHT_FREEZE, options
    # what is given is kept: adapters on a frozen base (the study's depth_only arm)
    frozen = resolve(TrainConfig.of(max_steps=1, depth_lora_rank=4, freeze=FROZEN_BASE_FREEZE), Runtime())
    assert frozen.build.depth_lora_rank == 4 and frozen.build.freeze == FROZEN_BASE_FREEZE
    # resolving is idempotent: a saved config reads back as the same run
    assert TrainConfig.from_dict(default.to_dict()) == default


def test_depth_adapter_training_options_are_checked():
    common = dict(max_steps=1, depth_lora_rank=4)
    with pytest.raises(ValueError, match="--mode loopus"):
        TrainConfig.of(mode="dense", **common)
    with pytest.raises(ValueError, match="not both"):
        TrainConfig.of(lora_rank=4, **common)
    with pytest.raises(ValueError, match="checkpointing"):
        resolve(TrainConfig.of(gradient_checkpointing=True, **common), Runtime())
    with pytest.raises(ValueError, match="supervise-first"):
        TrainConfig.of(max_steps=1, kl_base=1.0, supervise_first=False)


def kl_step(model, reference, seed: int = 0) -> dict[str, float]:
    ids = torch.randint(4, 97, (2, 12), generator=torch.Generator().manual_seed(seed))
    return rds_step(model, ids, ids.roll(-1, 1), RDSPlan(3, (1, 3)), RDSConfig(kl_base=1.0, lambda_conf=0.0),
                    reference=reference)


def test_kl_to_the_base_is_zero_before_training_and_grows_when_loop_one_moves():
    model = loopus.convert(tiny_base("llama").train(), 2, 1)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    assert kl_step(model, reference)["kl@1"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        torch.nn.init.normal_(model.layers[3].mlp.down_proj.weight, std=2.0)
    model.zero_grad()
    moved = kl_step(model, reference)["kl@1"]
    assert moved > 1e-3
    # the term's gradient points back toward the base: one small step against it lowers the KL
    kl_only = copy.deepcopy(model)
    kl_only.zero_grad()
    ids = torch.randint(4, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    rds_step(kl_only, ids, torch.full_like(ids, -100).index_fill_(1, torch.tensor([0]), 5), RDSPlan(1, (1,)),
             RDSConfig(kl_base=1.0, lambda_conf=0.0), reference=reference)
    with torch.no_grad():
        for p in kl_only.parameters():
            if p.grad is not None:
                p.sub_(0.05 * p.grad)
    assert kl_step(kl_only, reference)["kl@1"] < moved


def test_kl_training_keeps_one_loop_closer_to_the_base(tmp_path):
    write_corpus(tmp_path / "data")
    common = dict(model="unused", data=str(tmp_path / "data"), corpus=["tiny"], seq_len=16, batch_size=2,
                  max_steps=10, lr=1e-2, horizon_min=2, horizon_max=3, supervise_first=True,
                  freeze=["embeddings"], eval_at_start=False, eval_at_end=False, progress=False, tensorboard=False)
    base_logits = tiny_base("llama")(IDS).logits.detach()
    moved = {}
    for kl in (0.0, 5.0):
        cfg = TrainConfig.of(out=str(tmp_path / f"kl{kl}"), kl_base=kl, **common)
        trainer = Trainer(cfg, model=loopus.convert(tiny_base("llama").train(), 2, 1), tokenizer=char_tokenizer())
        trainer.train()
        one = logits(trainer.core.eval(), 1)
        moved[kl] = torch.nn.functional.kl_div(one.log_softmax(-1), base_logits.log_softmax(-1), log_target=True,
                                               reduction="batchmean").item()
    assert moved[5.0] < moved[0.0] / 2
