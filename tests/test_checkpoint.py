"""save_pretrained / from_pretrained round trip, tied embeddings, and refusal of bad checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_base
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import loopus
from loopus import CheckpointError, LoopUSForCausalLM


def test_round_trip_gives_identical_logits(family, tmp_path):
    model = loopus.convert(tiny_base(family), 2, 1, num_loops=3)
    torch.nn.init.normal_(model.gate.up.weight, std=0.1)  # non-default gate weights must survive too
    ids = torch.randint(3, model.config.base_config.vocab_size, (2, 8))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), loopus.LoopUSConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LoopUSForCausalLM)
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(got, expected)


def test_tied_embeddings_stay_tied(tmp_path):
    model = loopus.convert(tiny_base("gemma3_text"), 1, 1)
    assert model.base.lm_head.weight is model.base.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base.model.embed_tokens.weight" in keys
    assert "base.lm_head.weight" not in keys  # no stored copy of the tied head
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.base.lm_head.weight.data_ptr() == loaded.base.model.embed_tokens.weight.data_ptr()


def test_untied_head_is_saved_and_restored(tmp_path):
    base = tiny_base("llama")
    assert not base.config.tie_word_embeddings
    model = loopus.convert(base, 1, 1)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.base.lm_head.weight, base.lm_head.weight)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        LoopUSForCausalLM.from_pretrained(tmp_path / "nowhere")


def test_directory_without_weights_is_refused(tmp_path):
    loopus.convert(tiny_base("llama"), 1, 1).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        LoopUSForCausalLM.from_pretrained(tmp_path)


def test_truncated_weights_are_refused(tmp_path):
    loopus.convert(tiny_base("llama"), 1, 1).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="partial"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_weights_lacking_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    loopus.convert(tiny_base("llama"), 1, 1).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("gate.up.weight")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks 1 weights"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_config_is_refused(tmp_path):
    loopus.convert(tiny_base("llama"), 1, 1).save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        LoopUSForCausalLM.from_pretrained(tmp_path)


def test_config_round_trip_keeps_the_split(tmp_path):
    model = loopus.convert(tiny_base("qwen2"), 2, 3, num_loops=6, gate_rank=8)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "loopus"
    assert saved["base_config"]["model_type"] == "qwen2"
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.encoder_layers, config.decoder_layers, config.num_loops, config.gate_rank) == (2, 3, 6, 8)


def test_a_plain_checkpoint_is_refused_before_any_model_is_built(tmp_path):
    """A plain Llama directory must not be read as a LoopUS config with a default 4096-wide base."""
    tiny_base("llama").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a LoopUS checkpoint.*'llama'.*loopus convert"):
        LoopUSForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a LoopUS checkpoint"):
        loopus.LoopUSConfig.from_pretrained(tmp_path)
