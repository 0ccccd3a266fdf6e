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
    assert torch.equal(got[keep], expected[keep])  # the same layer calls on the same inputs: bit for bit


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
    assert torch.equal(got, expected)


def test_gate_starts_at_its_init_share_and_one_step_makes_it_input_dependent():
    model = loopus.convert(tiny_base("llama"), 1, 1, gate_init=0.3)
    ids = torch.randint(3, model.config.base_config.vocab_size, (2, 9))
    with torch.no_grad():
        start = model(ids, num_loops=3, output_loop_states=True).gate_coefficients
    for a in start:  # the same share for every token and channel
        torch.testing.assert_close(a, torch.full_like(a, 0.3))
    optimizer = torch.optim.SGD(model.gate.parameters(), lr=1.0)
    model(ids, labels=ids, num_loops=3).loss.backward()
    optimizer.step()
    with torch.no_grad():
        trained = model(ids, num_loops=3, output_loop_states=True).gate_coefficients
    for a in trained:
        spread = a.std(dim=1)  # per sequence and channel, across tokens
        assert (spread > 0).all() and spread.mean() > 1e-3  # every channel's share now differs between tokens
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


@pytest.mark.parametrize("encoder, decoder", [(2.0, 1), (True, 1), (1, "2"), ([0, 1.0], 1)])
def test_split_counts_must_be_integers(encoder, decoder):
    with pytest.raises(SplitError, match="must be a layer count|integer layer indices"):
        loopus.convert(tiny_base("llama"), encoder, decoder)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gate_rank=0), "gate_rank must be >= 1"),
        (dict(gate_rank=2.5), "gate_rank must be an integer"),
        (dict(num_loops=2.7), "num_loops must be an integer"),
        (dict(num_loops=True), "num_loops must be an integer"),
        (dict(gate_init=1.0), "gate_init must be a number in"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        loopus.convert(tiny_base("llama"), 2, 1, **kwargs)


def test_a_fractional_loop_budget_is_refused_not_truncated():
    model = loopus.convert(tiny_base("llama"), 2, 1)
    with pytest.raises(ValueError, match="num_loops must be an integer, got 2.7"):
        model(torch.tensor([[5, 6, 7]]), num_loops=2.7)


def test_peft_lora_without_target_modules_uses_the_base_defaults():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(loopus.convert(tiny_base("llama"), 2, 1), LoraConfig(task_type="CAUSAL_LM", r=2))
    adapted = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name.endswith(("q_proj", "v_proj"))}
    assert adapted == {"q_proj", "v_proj"}
    lora_layers = [name for name, _ in model.named_parameters() if "lora_A" in name]
    assert len(lora_layers) == 2 * 6  # q and v of every base layer, as PEFT does for the base model


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


@pytest.mark.parametrize("path", ["/no/such/dir", "./no-such-dir", "../no/such", "~/no-such-loopus-dir", "a/b/c"])
def test_a_missing_base_model_path_is_named(path, tmp_path):
    from loopus.zoo import load_base

    with pytest.raises(FileNotFoundError, match=f"^base model path {path} does not exist$"):
        load_base(path)
    with pytest.raises(FileNotFoundError, match=f"^base model path {path} does not exist$"):
        loopus.convert(path, 1, 1)


def test_hub_ids_are_not_taken_for_paths():
    from loopus.checkpoint import looks_like_path

    assert not looks_like_path("google/gemma-3-270m") and not looks_like_path("gpt2")
    assert looks_like_path("/abs/model") and looks_like_path("./m") and looks_like_path("~/m")
    assert looks_like_path("runs/a/model")


def test_convert_command_names_a_missing_base_path_in_one_line(tmp_path, capsys):
    from loopus.cli import main

    for extra in ([], ["--encoder-layers", "1", "--decoder-layers", "1"]):
        code = main(["convert", "/no/such/dir", "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert code == 2
        assert err.strip() == "loopus convert: error: base model path /no/such/dir does not exist"
        assert "Traceback" not in err and "Repo id" not in err
    assert not (tmp_path / "out").exists()


def test_cli_prints_refused_input_in_one_line_and_keeps_the_traceback_of_a_bug(monkeypatch, capsys):
    import loopus.commands.convert as convert_command
    from loopus.cli import main
    from loopus.errors import LoopUSError

    def failing_with(err: Exception):
        def run(args):
            raise err

        return run

    argv = ["convert", "base", "--encoder-layers", "1", "--decoder-layers", "1", "--out", "out"]
    for refused in (LoopUSError("checkpoint x is truncated"), SplitError("split x overlaps"),
                    FileNotFoundError("data path x does not exist")):
        monkeypatch.setattr(convert_command, "run", failing_with(refused))
        assert main(argv) == 2
        assert capsys.readouterr().err == f"loopus convert: error: {refused}\n"
    monkeypatch.setattr(convert_command, "run", failing_with(RuntimeError("mat1 and mat2 shapes cannot be multiplied")))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(argv)
