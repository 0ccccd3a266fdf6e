"""bench/gpu_reasoning.py on CPU with a tiny budget, and `Trainer.fused_loss`, where it plugs a fused linear cross
entropy into: with the plain computation as a stand-in, a training step is exactly the chunked one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_base
from eval_fixtures import make_tiny_checkpoints

from loopus.train.objective import RDSPlan, chunked_cross_entropy, rds_step
from test_train_helpers import tiny_loopus
from test_train_objective import batch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_reasoning

    return gpu_reasoning


def plain_loss(hidden, targets, logits_fn):
    """The stand-in: the same projection and loss as the chunks, in one piece."""
    logits = logits_fn(hidden).float()
    nll = F.cross_entropy(logits, targets, reduction="none")
    return nll.sum(), nll.detach(), logits.argmax(-1)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_loss_stand_in_gives_the_chunked_step_exactly():
    ids, labels = batch()
    model = tiny_loopus()
    fused = copy.deepcopy(model)
    plan = RDSPlan(3, (1, 3))
    expected = rds_step(model, ids, labels, plan)
    calls = []

    def counted(*a):
        calls.append(a[0].shape[0])
        return plain_loss(*a)

    got = rds_step(fused, ids, labels, plan, fused=counted)
    assert calls == [int((labels != -100).sum())] * 2  # every labelled position, once per supervised step
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7)
    want, have = grads(model), grads(fused)
    assert want.keys() == have.keys() and want
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-7)


def test_fused_loss_replaces_the_chunks_only_where_it_is_given():
    model = tiny_base("llama")
    hidden = torch.randn(2, 5, model.config.hidden_size)
    labels = torch.randint(0, model.config.vocab_size, (2, 5))
    head = model.get_output_embeddings().requires_grad_(False)
    marked = lambda h, y, f: (h.sum() * 0.0 + 7.0, torch.zeros(len(y)), torch.zeros(len(y), dtype=torch.long))
    assert float(chunked_cross_entropy(hidden, labels, head, fused=marked).loss_sum) == 7.0
    # a reference term (KL toward the base) needs the logits: the chunks compute it as before
    ref = chunked_cross_entropy(hidden, labels, head, reference=(hidden, head), fused=marked)
    assert float(ref.loss_sum) != 7.0 and float(ref.kl_sum) == pytest.approx(0.0, abs=1e-5)
    assert float(chunked_cross_entropy(hidden, labels, head).loss_sum) == pytest.approx(
        float(plain_loss(hidden.reshape(10, -1), labels.reshape(-1), head)[0]), rel=1e-6)


def test_script_trains_both_arms_at_equal_tokens_and_scores_every_loop_count(bench, tmp_path, data_dir):
    base_dir, _ = make_tiny_checkpoints(tmp_path / "tiny")
    out = tmp_path / "run"
    assert bench.main(["--model", str(base_dir), "--split", "2,1", "--tasks", "mult_5x5", "--out", str(out),
                       "--data", str(data_dir), "--train-minutes", "0.05", "--batch-size", "2", "--probe-steps", "2",
                       "--max-steps", "2", "--train-size", "32", "--limit", "2", "--loops", "1,2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["tasks"]["mult_5x5"]
    dense, looped = entry["arms"]["dense"], entry["arms"]["default"]
    assert dense["tokens"] == looped["tokens"] == entry["steps"] * 2 * 48  # equal tokens: steps x rows x row length
    assert entry["steps"] <= 2 and entry["probe_tokens_per_s"] > 0
    assert list(dense["scores"]) == ["1"] and list(looped["scores"]) == ["1", "2"]
    for arm in (dense, looped):
        assert arm["tokens_per_s"] > 0 and arm["mfu"] is None  # no GPU peak on CPU
        for scores in arm["scores"].values():
            assert scores[bench.METRIC] in (0.0, 0.5, 1.0)
    assert 0 < entry["labelled_share"] < 1 and summary["precision"] == "fp32"
    assert "| mult_5x5 | default | 2 |" in (out / "summary.md").read_text()


def test_sft_flops_counts_the_head_only_at_labelled_positions(bench):
    from gpu_study import step_flops
    from loopus.train import TrainConfig

    config = tiny_base("gemma3_text").config
    cfg = TrainConfig.of(recipe="default", encoder_layers=2, decoder_layers=1, max_steps=1, seq_len=48)
    headless = copy.deepcopy(config)
    headless.vocab_size = 0
    assert bench.sft_flops(cfg, config, 1.0) == pytest.approx(step_flops(cfg, config))
    assert bench.sft_flops(cfg, config, 0.0) == pytest.approx(step_flops(cfg, headless))
    assert step_flops(cfg, headless) < step_flops(cfg, config)


def test_fused_ce_without_liger_is_one_clear_error(bench, capsys):
    try:
        import liger_kernel  # noqa: F401
        pytest.skip("liger-kernel is installed here")
    except ImportError:
        pass
    with pytest.raises(SystemExit) as done:
        bench.main(["--fused-ce", "--out", "unused"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--fused-ce needs liger-kernel" in err and "pip install" in err


def test_trainer_trains_with_its_fused_loss_exactly_as_with_the_chunks(tmp_path):
    from loopus.train import Trainer, TrainConfig
    from loopus.train.data import build_data
    from conftest import char_tokenizer
    from test_train_helpers import write_corpus

    write_corpus(tmp_path / "data")
    data = build_data(char_tokenizer(), ["tiny"], str(tmp_path / "data"), seq_len=16, train_rows=4, valid_rows=2)
    calls = []

    def counted(*a):
        calls.append(a[0].shape[0])
        return plain_loss(*a)

    trained = {}
    for name, fused in (("chunks", None), ("fused", counted)):
        cfg = TrainConfig.of(model="unused", out=str(tmp_path / name), data=str(tmp_path / "data"), corpus=["tiny"],
                             seq_len=16, batch_size=2, max_steps=2, eval_at_start=False, eval_at_end=False,
                             progress=False, tensorboard=False)
        trainer = Trainer(cfg, model=tiny_loopus("llama"), tokenizer=char_tokenizer(), data=data)
        trainer.fused_loss = fused
        trainer.train()
        trained[name] = trainer.core.state_dict()
    assert calls and all(n > 0 for n in calls)  # every supervised step of both optimiser steps
    for key, value in trained["chunks"].items():
        torch.testing.assert_close(trained["fused"][key], value, rtol=1e-5, atol=1e-6)
