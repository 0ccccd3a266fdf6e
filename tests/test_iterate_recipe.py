"""The recipe built for iteration: input injection, a gate floor, a wide ramped horizon draw, truncated
backpropagation, and the whole of it trained and resumed exactly."""

from __future__ import annotations

import statistics

import pytest
import torch

import loopus
from loopus.train import TrainConfig, Trainer
from loopus.train.checkpointing import list_checkpoints
from loopus.train.data import build_data
from loopus.train.objective import RDSConfig, draw_horizon, sample_plan
from loopus.train.optim import is_new_module
from loopus.train.recipes import ITERATE, RECIPES
from conftest import char_tokenizer, tiny_base
from test_train_helpers import kill_inside_step, write_corpus

torch.set_num_threads(1)
IDS = torch.randint(4, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def logits(model, num_loops: int, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, num_loops=num_loops, use_cache=False).logits


def injected(family: str, seed: int = 0, **options):
    model = loopus.convert(tiny_base(family, seed), 2, 1, input_injection=True, gate_init=0.5, **options).eval()
    torch.manual_seed(seed + 1)
    torch.nn.init.normal_(model.injection.weight, std=0.3)  # as after training: the injection acts
    return model


def test_input_injection_starts_at_zero_so_every_loop_count_is_unchanged(family):
    plain = loopus.convert(tiny_base(family), 2, 1, gate_init=0.3).eval()
    with_injection = loopus.convert(tiny_base(family), 2, 1, gate_init=0.3, input_injection=True).eval()
    with_injection.gate.load_state_dict(plain.gate.state_dict())
    assert plain.injection is None and not with_injection.injection.weight.any()
    for n in (1, 2, 5):
        assert torch.equal(logits(with_injection, n), logits(plain, n))


def test_a_trained_injection_acts_from_loop_two_on_only(family):
    model = injected(family)
    plain = loopus.convert(tiny_base(family), 2, 1, gate_init=0.5).eval()
    plain.gate.load_state_dict(model.gate.state_dict())
    assert torch.equal(logits(model, 1), logits(plain, 1))
    assert not torch.allclose(logits(model, 3), logits(plain, 3), atol=1e-4)


def test_injected_loops_decode_with_the_cache_as_without_it(family):
    model = injected(family)
    model.generation_config.eos_token_id = None
    prompt = IDS[:1, :5]
    cached = model.generate(prompt, max_new_tokens=5, do_sample=False, num_loops=3)
    ids = prompt
    for _ in range(5):  # recompute the whole sequence at every step
        ids = torch.cat([ids, logits(model, 3, ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, ids)


def test_injected_loops_exit_per_row_as_each_row_alone():
    model = injected("llama")
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        both = model(IDS, attention_mask=mask, num_loops=6, exit_strategy="convergence", exit_threshold=0.5,
                     prefill_exit=True, use_cache=False)
        for row in range(2):
            alone = model(IDS[row:row + 1], attention_mask=mask[row:row + 1], num_loops=6,
                          exit_strategy="convergence", exit_threshold=0.5, prefill_exit=True, use_cache=False)
            assert torch.equal(both.loop_passes[row], alone.loop_passes[0])
            torch.testing.assert_close(both.logits[row], alone.logits[0], rtol=1e-5, atol=1e-5)


def test_a_saved_injection_loads_back(tmp_path):
    model = injected("llama")
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config.input_injection and torch.equal(loaded.injection.weight, model.injection.weight)
    assert torch.equal(logits(loaded, 3), logits(model, 3))


def test_the_gate_floor_bounds_the_share_and_leaves_the_init():
    model = loopus.convert(tiny_base("llama"), 2, 1, gate_init=0.02, gate_floor=0.01)
    h = torch.randn(2, 5, model.config.base_config.hidden_size)
    proposal = h + torch.randn_like(h)
    torch.testing.assert_close(model.gate.coefficient(proposal, h), torch.full_like(h, 0.02))
    torch.nn.init.constant_(model.gate.up.bias, 60.0)  # a gate trained to close: without a floor a -> 0
    share = model.gate.coefficient(proposal, h)
    assert share.min() >= 0.01 and share.max() < 0.0101
    no_floor = loopus.convert(tiny_base("llama"), 2, 1, gate_init=0.02)
    torch.nn.init.constant_(no_floor.gate.up.bias, 60.0)
    assert no_floor.gate.coefficient(proposal, h).max() < 1e-20


@pytest.mark.parametrize("floor", [0.02, 0.5, -0.1, True])
def test_a_floor_at_or_above_the_init_is_refused(floor):
    with pytest.raises(ValueError, match="gate_floor"):
        loopus.convert(tiny_base("llama"), 2, 1, gate_init=0.02, gate_floor=floor)


def ramped(**options) -> RDSConfig:
    values = dict(horizon_min=1, horizon_max=16, horizon_dist="poisson_lognormal", horizon_mean=6.0,
                  horizon_ramp=(0.25, 0.75))
    return RDSConfig(**{**values, **options})


def horizons(cfg: RDSConfig, progress: float, draws: int = 4000) -> list[int]:
    generator = torch.Generator().manual_seed(0)
    return [draw_horizon(generator, cfg, progress) for _ in range(draws)]


def test_the_wide_horizon_draw_ramps_its_mean_and_has_a_long_tail():
    cfg = ramped()
    assert set(horizons(cfg, 0.1)) == {1}  # before the ramp: the one loop only
    middle, end = horizons(cfg, 0.5), horizons(cfg, 0.9)
    assert abs(statistics.mean(middle) - 3.5) < 0.15
    late = statistics.mean(end)
    assert 5.6 < late < 6.1  # the mean, a little under 6 where the draw is clipped at 16
    assert max(end) == 16 and sum(t >= 12 for t in end) > 40  # far deeper than the mean, often
    assert min(end) == 1
    assert horizons(cfg, 0.9) == end  # reproducible from the generator


def test_a_plan_of_the_iterate_recipe_backpropagates_through_the_last_loops_only():
    cfg = RDSConfig(**{k: v for k, v in ITERATE.items() if k in RDSConfig.__dataclass_fields__})
    generator = torch.Generator().manual_seed(3)
    plans = [sample_plan(generator, cfg, progress=1.0) for _ in range(200)]
    deep = [p for p in plans if p.horizon >= 8]
    assert deep
    for plan in deep:
        assert plan.supervised == (1, plan.horizon)
        mask = plan.grad_mask()
        assert mask[0] and sum(mask) == 1 + cfg.grad_steps and all(mask[plan.horizon - cfg.grad_steps:])


@pytest.mark.parametrize("options, message", [
    (dict(horizon_mean=20.0), "horizon_mean"),
    (dict(horizon_mean=0.5), "horizon_mean"),
    (dict(horizon_ramp=(0.8, 0.2)), "horizon_ramp"),
    (dict(horizon_ramp=(0.5,)), "horizon_ramp"),
    (dict(horizon_dist="geometric"), "horizon_dist"),
])
def test_bad_horizon_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        ramped(**options).check()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    return root


def iterate_config(out, corpus, **overrides):
    values = {**{k: v for k, v in ITERATE.items() if k not in ("freeze",)},
              "model": "unused", "out": str(out), "data": str(corpus), "corpus": ["tiny"], "seq_len": 16,
              "batch_size": 2, "max_steps": 6, "lr": 1e-2, "horizon_max": 6, "horizon_mean": 3.0,
              "grad_steps": 2, "depth_lora_rank": 4, "eval_at_start": False, "eval_at_end": False,
              "progress": False, "tensorboard": False, "save_every": 2, "freeze": ["embeddings", "encoder"]}
    values.update(overrides)
    return TrainConfig.of(**values)


def iterate_model():
    return loopus.convert(tiny_base("llama").train(), 1, 1, gate_rank=8, input_injection=True, gate_floor=0.01,
                          depth_lora_rank=4)


def test_the_iterate_recipe_trains_the_injection_and_resumes_bit_identical(tmp_path, corpus):
    assert "iterate" in RECIPES and is_new_module("injection.weight")
    tok = char_tokenizer()
    packed = build_data(tok, ["tiny"], str(corpus), seq_len=16, train_rows=64, valid_rows=4)
    straight = Trainer(iterate_config(tmp_path / "a", corpus), model=iterate_model(), tokenizer=tok, data=packed)
    straight.train()
    assert straight.core.injection.weight.abs().sum() > 0  # the injection learned something
    killed = Trainer(iterate_config(tmp_path / "b", corpus), model=iterate_model(), tokenizer=tok, data=packed)

    kill_inside_step(killed, 4, 1)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-00000002", "step-00000004"]
    resumed = Trainer(iterate_config(tmp_path / "b", corpus, resume=True), model=iterate_model(), tokenizer=tok,
                      data=packed)
    resumed.train()
    a, b = straight.core.state_dict(), resumed.core.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_injection_with_a_trainable_encoder_trains_it_through_loop_one(tmp_path, corpus):
    model = iterate_model()
    before = model.layers[0].mlp.up_proj.weight.detach().clone()
    Trainer(iterate_config(tmp_path / "e", corpus, freeze=["embeddings"], max_steps=3, horizon_ramp=(0.0, 0.0)),
            model=model, tokenizer=char_tokenizer()).train()
    assert not torch.equal(model.layers[0].mlp.up_proj.weight, before)


def test_loopus_convert_takes_the_iteration_options(tmp_path):
    from loopus.cli import main as cli_main

    tiny_base("llama").save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    assert cli_main(["convert", str(tmp_path / "base"), "--encoder-layers", "1", "--decoder-layers", "1",
                     "--input-injection", "--gate-floor", "0.01", "--out", str(tmp_path / "looped")]) == 0
    model = loopus.LoopUSForCausalLM.from_pretrained(tmp_path / "looped")
    assert model.config.input_injection and model.config.gate_floor == 0.01 and model.injection is not None
    assert cli_main(["convert", str(tmp_path / "base"), "--encoder-layers", "1", "--decoder-layers", "1",
                     "--gate-floor", "0.5", "--out", str(tmp_path / "bad")]) != 0
