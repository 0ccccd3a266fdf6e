"""Shared fixtures: tiny random models from real `transformers` configs, and the real Gemma 3 270M."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

import loopus  # noqa: F401  (registers the Auto classes)

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8),
    # a window shorter than the test sequences, so sliding attention is exercised
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=5),
    # Gemma3 alternates sliding and full layers, each with its own RoPE base
    "gemma3_text": lambda: Gemma3TextConfig(
        **COMMON,
        head_dim=8,
        sliding_window=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
        tie_word_embeddings=True,
    ),
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0),
}


def tiny_base(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(TINY_CONFIGS[family]()).eval()


def tiny_looped(family: str = "llama", num_loops: int = 3, seed: int = 0):
    """A tiny LoopUS model (split 2/…/1) whose gate is input dependent, as after training."""
    import loopus

    # an open gate (the paper's share of 0.5) with random input-dependent weights: loops move the state
    model = loopus.convert(tiny_base(family, seed), 2, 1, num_loops=num_loops, gate_init=0.5).eval()
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.gate.up.weight, std=0.3)
    model.generation_config.eos_token_id = None  # random weights: compare whole continuations
    return model


@pytest.fixture(params=sorted(TINY_CONFIGS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = os.environ.get("LOOPUS_DATA", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    path = Path(root)
    if not path.is_dir():
        pytest.fail(f"test data directory {path} not found: set LOOPUS_DATA")
    return path


@pytest.fixture(scope="session")
def gemma():
    """The real embedded Gemma 3 270M (fp32) and its tokenizer, from the cached safetensors conversion."""
    from loopus.zoo import load_base

    return load_base("gemma-3-270m")
