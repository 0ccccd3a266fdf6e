"""Shared fixtures and helpers: tiny random models from real `transformers` configs, a character
tokenizer for them, and the real Gemma 3 270M."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
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

# family -> config builder; keyword arguments override any field
TINY_CONFIGS = {
    "llama": lambda **fields: LlamaConfig(**{**COMMON, **fields}),
    "qwen2": lambda **fields: Qwen2Config(**{**COMMON, **fields}),
    "qwen3": lambda **fields: Qwen3Config(**{**COMMON, "head_dim": 8, **fields}),
    # a window shorter than the test sequences, so sliding attention is exercised
    "mistral": lambda **fields: MistralConfig(**{**COMMON, "sliding_window": 5, **fields}),
    # Gemma3 alternates sliding and full layers, each with its own RoPE base
    "gemma3_text": lambda **fields: Gemma3TextConfig(**{
        **COMMON,
        "head_dim": 8,
        "sliding_window": 5,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
        "tie_word_embeddings": True,
        **fields,
    }),
    "phi3": lambda **fields: Phi3Config(**{**COMMON, "pad_token_id": 0, **fields}),
}

# 4 special tokens and 93 characters: the tiny models' 97 ids (the same pad, BOS and EOS ids as their configs)
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = "\n" + "".join(chr(code) for code in range(32, 127) if chr(code) not in "^`~")


def tiny_base(family: str, seed: int = 0, **fields):
    """A tiny random base model of `family`, its config fields overridden by `fields`."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(TINY_CONFIGS[family](**fields)).eval()


def tiny_looped(family: str = "llama", num_loops: int = 3, seed: int = 0):
    """A tiny LoopUS model (split 2/…/1) whose gate is input dependent, as after training."""
    # an open gate (the paper's share of 0.5) with random input-dependent weights: loops move the state
    model = loopus.convert(tiny_base(family, seed), 2, 1, num_loops=num_loops, gate_init=0.5).eval()
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.gate.up.weight, std=0.3)
    model.generation_config.eos_token_id = None  # random weights: compare whole continuations
    return model


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer for the tiny models: one id per character, BOS prepended."""
    vocab = {token: i for i, token in enumerate([*SPECIALS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


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
