"""Recast a pretrained causal LM as a LoopUS model, without copying its weights."""

from __future__ import annotations

import copy
import os
from typing import Sequence

from transformers import PreTrainedModel

from .config import SUPPORTED_MODEL_TYPES, LoopUSConfig, SplitError, resolve_split
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


def _resolve_auto_split(
    base_model: PreTrainedModel,
    tokenizer,
    split,
    data,
    calibration,
    calibration_tokens: int,
    constraints,
) -> tuple[int, int, dict | None]:
    """(encoder, decoder, analysis) for `split` = "auto", a split.json path, or an (encoder, decoder) pair."""
    from .dynamics import analyze, load_split

    if isinstance(split, (tuple, list)):
        if len(split) != 2:
            raise SplitError(f"split must be 'auto', a split.json path or (encoder, decoder), got {split!r}")
        return int(split[0]), int(split[1]), None
    if isinstance(split, str) and split == "auto":
        if tokenizer is None:
            source = getattr(base_model.config, "_name_or_path", "")
            if source and os.path.isdir(source):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(source)
            else:
                raise ValueError("split='auto' runs the base model on calibration text: pass tokenizer=")
        analysis = analyze(
            base_model,
            tokenizer,
            data=data,
            calibration=calibration,
            tokens=calibration_tokens,
            constraints=constraints,
            progress=False,
        )
        return analysis["split"]["encoder_layers"], analysis["split"]["decoder_layers"], analysis
    if isinstance(split, (str, os.PathLike)):
        encoder, decoder = load_split(split)
        return encoder, decoder, None
    raise SplitError(f"split must be 'auto', a split.json path or (encoder, decoder), got {split!r}")


def convert(
    base_model: PreTrainedModel | str | os.PathLike,
    encoder_layers: int | Sequence[int] | str | None = None,
    decoder_layers: int | Sequence[int] | None = None,
    *,
    split: str | os.PathLike | tuple[int, int] | None = None,
    tokenizer=None,
    data: str | os.PathLike | None = None,
    calibration: str | os.PathLike | None = None,
    calibration_tokens: int = 1024,
    constraints=None,
    num_loops: int = 4,
    gate_rank: int = 64,
    gate_init: float = 0.02,
    kv_mode: str = "per_depth",
    depth_lora_rank: int = 0,
    depth_lora_alpha: float = 32.0,
) -> LoopUSForCausalLM:
    """Wrap `base_model` as encoder (first layers) -> looped reasoning block -> decoder (last layers).

    `encoder_layers` / `decoder_layers` are counts ("the first/last N layers") or explicit index lists.
    Instead of them, `split` may be "auto" (measure the base model's representation dynamics on
    calibration text from `data`/`calibration` and choose the split, see `loopus.dynamics`), the path
    of a split.json written by `loopus analyze`, or an (encoder, decoder) pair; `encoder_layers="auto"`
    is the same as `split="auto"`. An automatic choice is kept on the model as `model.split_analysis`.
    `base_model` may also be an embedded name, a checkpoint directory or a hub id. The returned model
    shares the base model's modules: with `num_loops=1` it computes exactly the base model.
    `depth_lora_rank > 0` adds depth-wise LoRA adapters that act from loop 2 on (`loopus.adapters`).
    """
    if isinstance(encoder_layers, str):
        if encoder_layers != "auto":
            raise SplitError(f"encoder_layers must be a count, an index list or 'auto', got {encoder_layers!r}")
        if split is not None and split != "auto":
            raise SplitError("encoder_layers='auto' conflicts with split=...")
        if decoder_layers is not None:
            raise SplitError("encoder_layers='auto' chooses the decoder too: leave decoder_layers out")
        split, encoder_layers = "auto", None
    if split is not None and (encoder_layers is not None or decoder_layers is not None):
        raise SplitError("give either split=... or encoder_layers/decoder_layers, not both")
    if split is None and (encoder_layers is None or decoder_layers is None):
        raise SplitError("give encoder_layers and decoder_layers, or split='auto' (or a split.json path)")
    if not isinstance(base_model, PreTrainedModel):
        from .zoo import load_base

        base_model, loaded_tokenizer = load_base(base_model)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    check_supported(base_model)
    analysis = None
    if split is not None:
        encoder_layers, decoder_layers, analysis = _resolve_auto_split(
            base_model, tokenizer, split, data, calibration, calibration_tokens, constraints
        )
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
        depth_lora_rank=depth_lora_rank,
        depth_lora_alpha=depth_lora_alpha,
        tie_word_embeddings=base_model.config.tie_word_embeddings,
        bos_token_id=base_model.config.bos_token_id,
        eos_token_id=base_model.config.eos_token_id,
        pad_token_id=base_model.config.pad_token_id,
    )
    model = LoopUSForCausalLM(config, base_model=base_model)
    model.generation_config = copy.deepcopy(base_model.generation_config)
    model.split_analysis = analysis
    return model.to(base_model.dtype).train(base_model.training)
