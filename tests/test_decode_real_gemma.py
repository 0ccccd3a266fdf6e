"""Looped decoding on the real embedded Gemma 3 270M: cache exactness, left padding, adaptive exit, the CLI."""

from __future__ import annotations

import pytest
import torch

import loopus
from loopus.cli import main
from loopus.compat import output_cache

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def looped(gemma):
    base, tokenizer = gemma
    model = loopus.convert(base, 4, 2, num_loops=2).eval()
    return model, tokenizer


def gen(model, batch, **kwargs):
    with torch.no_grad():
        return model.generate(
            **batch, do_sample=False, max_new_tokens=kwargs.pop("max_new_tokens", 4),
            return_dict_in_generate=True, output_logits=True, **kwargs,
        )


def test_real_gemma_cached_greedy_equals_recomputation(looped):
    model, tokenizer = looped
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    cached = gen(model, batch, num_loops=2)
    uncached = gen(model, batch, num_loops=2, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(cached.logits, uncached.logits)) < 1e-3


def test_real_gemma_left_padded_batch_equals_alone_with_adaptive_exit(looped):
    model, tokenizer = looped
    tokenizer.padding_side = "left"
    prompts = ["In 1905, Albert Einstein published", "Hi"]
    kwargs = dict(num_loops=3, exit_strategy="convergence", exit_threshold=0.2)
    batch = gen(model, tokenizer(prompts, return_tensors="pt", padding=True), **kwargs)
    width = batch.sequences.shape[1] - 4
    for row, prompt in enumerate(prompts):
        alone = gen(model, tokenizer([prompt], return_tensors="pt"), **kwargs)
        assert torch.equal(batch.sequences[row, width:], alone.sequences[0, -4:])
        gap = max((b[row] - a[0]).abs().max().item() for b, a in zip(batch.logits, alone.logits))
        assert gap < 1e-3
        assert torch.equal(output_cache(batch).loop_passes[row, -3:], output_cache(alone).loop_passes[0, -3:])


def test_real_gemma_generate_cli_streams_loop_counts(gemma, capsys, tmp_path):
    stats = tmp_path / "stats.json"
    rc = main([
        "generate", "gemma-3-270m", "The capital of France is", "--encoder-layers", "4", "--decoder-layers", "2",
        "--num-loops", "3", "--exit-strategy", "kl", "--exit-threshold", "0.05", "--max-new-tokens", "3",
        "--show-loops", "number", "--stats-json", str(stats),
    ])
    out = capsys.readouterr()
    assert rc == 0
    assert out.out.startswith("The capital of France is")
    assert out.out.count("[") == 3 and "]" in out.out
    assert "[loops] 3 tokens, mean" in out.err
    import json

    report = json.loads(stats.read_text())
    assert len(report["token_loops"]) == 3 and all(2 <= n <= 3 for n in report["token_loops"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-loops", "2", "--min-loops", "3", "--exit-strategy", "kl"], "min_loops=3 is larger than the budget"),
        (["--exit-threshold", "0.5"], "--exit-threshold needs --exit-strategy"),
        ([], "not a LoopUS checkpoint: give a split"),
    ],
)
def test_generate_cli_bad_input_is_one_clear_line(argv, message, capsys):
    rc = main(["generate", "gemma-3-270m", "Hi", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err
