"""Recast a pretrained causal LM as a LoopUS model, without copying its weights."""

from __future__ import annotations

import copy
import numbers
import os
from typing import Sequence

from transformers import PreTrainedModel

from .config import SUPPORTED_MODEL_TYPES, LoopUSConfig, SplitError
from .errors import LoopUSError
from .modeling import LoopUSForCausalLM
from .zoo import load_base


class UnsupportedArchitectureError(LoopUSError, ValueError):
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


def check_split(num_layers: int, encoder_layers: int, decoder_layers: int) -> None:
    """Refuse encoder / decoder layer counts that do not leave a reasoning block in `num_layers` layers.

    The encoder is the first `encoder_layers` base layers and the decoder the last `decoder_layers`;
    the loop runs the layers between them, so it must keep at least one. Raises `SplitError`.
    """
    for side, count in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        if isinstance(count, bool) or not isinstance(count, numbers.Integral):
            raise SplitError(
                f"{side}_layers must be a layer count (an int), got {count!r} ({type(count).__name__})"
            )
        if not 0 <= count < num_layers:
            raise SplitError(
                f"{side}_layers={count} is out of range for a model with {num_layers} layers: "
                f"give a count from 0 to {num_layers - 1}"
            )
    if encoder_layers + decoder_layers > num_layers:
        raise SplitError(
            f"encoder ({encoder_layers}) and decoder ({decoder_layers}) layers overlap in a model with "
            f"{num_layers} layers: together they may take at most {num_layers - 1}"
        )
    if encoder_layers + decoder_layers == num_layers:
        raise SplitError(
            f"encoder ({encoder_layers}) + decoder ({decoder_layers}) take all {num_layers} layers: "
            "the reasoning block must keep at least 1 layer, so give fewer encoder or decoder layers"
        )


def _as_count(layers: int | Sequence[int], num_layers: int, side: str) -> int:
    """A layer count from `N` or an explicit index list, checking that the list is a contiguous edge."""
    if not isinstance(layers, Sequence) or isinstance(layers, str):
        return layers  # a count, or no count at all: `check_split` judges it
    if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in layers):
        raise SplitError(f"{side}_layers={list(layers)} must list integer layer indices")
    indices = sorted(int(i) for i in layers)
    if len(set(indices)) != len(indices):
        raise SplitError(f"{side}_layers={list(layers)} repeats a layer index")
    bad = [i for i in indices if i < 0 or i >= num_layers]
    if bad:
        raise SplitError(f"{side}_layers has indices {bad} outside 0..{num_layers - 1}")
    expected = list(range(len(indices))) if side == "encoder" else list(range(num_layers - len(indices), num_layers))
    if indices != expected:
        edge = "first" if side == "encoder" else "last"
        raise SplitError(
            f"{side}_layers={indices} must be the {edge} {len(indices)} layers {expected}: "
            "the encoder is a prefix of the stack and the decoder a suffix"
        )
    return len(indices)


def split_counts(
    num_layers: int, encoder_layers: int | Sequence[int], decoder_layers: int | Sequence[int]
) -> tuple[int, int]:
    """Validate a split and return (encoder count, decoder count); the reasoning block is what lies between."""
    num_encoder = _as_count(encoder_layers, num_layers, "encoder")
    num_decoder = _as_count(decoder_layers, num_layers, "decoder")
    check_split(num_layers, num_encoder, num_decoder)
    return int(num_encoder), int(num_decoder)


def convert(
    base_model: PreTrainedModel | str | os.PathLike,
    encoder_layers: int | Sequence[int],
    decoder_layers: int | Sequence[int],
    *,
    num_loops: int | None = None,
    gate_rank: int | None = None,
    gate_init: float | None = None,
    gate_floor: float | None = None,
    input_injection: bool | None = None,
    kv_mode: str | None = None,
    depth_lora_rank: int | None = None,
    depth_lora_alpha: float | None = None,
    depth_lora_count: int | None = None,
) -> LoopUSForCausalLM:
    """Wrap `base_model` as encoder (first layers) -> looped reasoning block -> decoder (last layers).

    `encoder_layers` / `decoder_layers` are counts ("the first/last N layers") or explicit index lists.
    To choose them from the base model's representation dynamics ("auto") or a split.json, use
    `loopus.dynamics.convert_auto`. `base_model` may also be an embedded name, a checkpoint directory or
    a hub id. The returned model shares the base model's modules: with `num_loops=1` it computes exactly
    the base model. `num_loops`, `gate_rank`, `gate_init`, `gate_floor`, `input_injection`, `kv_mode` and
    `depth_lora_rank`/`_alpha`/`_count` are stored in the model's `LoopUSConfig` (see it for their meaning); left out, they take its defaults.
    `depth_lora_rank > 0` adds depth-wise LoRA adapters that act from loop 2 on (`loopus.adapters`).
    """
    for side, layers in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        if isinstance(layers, (str, os.PathLike)):
            raise SplitError(
                f"{side}_layers must be a layer count (an int) or an index list, got {layers!r}: to choose the "
                "split automatically or read a split.json, use loopus.dynamics.convert_auto(base, split)"
            )
    if not isinstance(base_model, PreTrainedModel):
        base_model, _ = load_base(base_model)
    check_supported(base_model)
    num_encoder, num_decoder = split_counts(base_model.config.num_hidden_layers, encoder_layers, decoder_layers)
    options = dict(num_loops=num_loops, gate_rank=gate_rank, gate_init=gate_init, gate_floor=gate_floor,
                   input_injection=input_injection, kv_mode=kv_mode,
                   depth_lora_rank=depth_lora_rank, depth_lora_alpha=depth_lora_alpha,
                   depth_lora_count=depth_lora_count)
    config = LoopUSConfig(
        base_config=base_model.config,
        attn_implementation=base_model.config._attn_implementation,
        encoder_layers=num_encoder,
        decoder_layers=num_decoder,
        **{name: value for name, value in options.items() if value is not None},
        tie_word_embeddings=base_model.config.tie_word_embeddings,
        bos_token_id=base_model.config.bos_token_id,
        eos_token_id=base_model.config.eos_token_id,
        pad_token_id=base_model.config.pad_token_id,
    )
    model = LoopUSForCausalLM(config, base_model=base_model)
    model.generation_config = copy.deepcopy(base_model.generation_config)
    return model.to(base_model.dtype).train(base_model.training)


def as_looped(model: PreTrainedModel, encoder_layers: int, decoder_layers: int) -> LoopUSForCausalLM:
    """A LoopUS model as it is; a plain causal LM recast with the split, so that it can be scored next to
    LoopUS models loop by loop (at one loop it computes exactly the plain model)."""
    return model if isinstance(model, LoopUSForCausalLM) else convert(model, encoder_layers, decoder_layers)
