"""Recast a pretrained causal LM as a LoopUS model, without copying its weights."""

from __future__ import annotations

import copy
import os
from typing import Sequence

from transformers import PreTrainedModel

from .config import SUPPORTED_MODEL_TYPES, LoopUSConfig, resolve_split
from .modeling import LoopUSForCausalLM


class UnsupportedArchitectureError(ValueError):
    """The base model's family has no adapter."""


def check_supported(base_model: PreTrainedModel) -> None:
    """Only decoder-only families whose layers, masks and rotary embeddings have been verified exact."""
    config = base_model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{config.model_type}' ({type(base_model).__name__}); "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedArchitectureError("bidirectional-attention variants are not decoder-only LMs")


def convert(
    base_model: PreTrainedModel | str | os.PathLike,
    encoder_layers: int | Sequence[int],
    decoder_layers: int | Sequence[int],
    *,
    num_loops: int = 4,
    gate_rank: int = 64,
    gate_init: float = 0.5,
    kv_mode: str = "per_depth",
) -> LoopUSForCausalLM:
    """Wrap `base_model` as encoder (first layers) -> looped reasoning block -> decoder (last layers).

    `encoder_layers` / `decoder_layers` are counts ("the first/last N layers") or explicit index lists.
    `base_model` may also be an embedded name, a checkpoint directory or a hub id. The returned model
    shares the base model's modules: with `num_loops=1` it computes exactly the base model.
    """
    if not isinstance(base_model, PreTrainedModel):
        from .zoo import load_base

        base_model, _ = load_base(base_model)
    check_supported(base_model)
    num_encoder, num_decoder = resolve_split(base_model.config.num_hidden_layers, encoder_layers, decoder_layers)
    attn_implementation = base_model.config._attn_implementation
    config = LoopUSConfig(
        base_config=base_model.config,
        attn_implementation=attn_implementation,
        encoder_layers=num_encoder,
        decoder_layers=num_decoder,
        num_loops=num_loops,
        gate_rank=gate_rank,
        gate_init=gate_init,
        kv_mode=kv_mode,
        tie_word_embeddings=base_model.config.tie_word_embeddings,
        bos_token_id=base_model.config.bos_token_id,
        eos_token_id=base_model.config.eos_token_id,
        pad_token_id=base_model.config.pad_token_id,
    )
    model = LoopUSForCausalLM(config, base_model=base_model)
    model.generation_config = copy.deepcopy(base_model.generation_config)
    return model.to(base_model.dtype).train(base_model.training)
