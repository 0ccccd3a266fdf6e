"""`LoopUSForCausalLM`: a pretrained causal LM run as encoder -> looped reasoning block -> decoder.

The wrapped model (`self.base`, e.g. a `Gemma3ForCausalLM`) keeps its own modules and weights; this
class only decides the order in which its decoder layers run:

    h_0    = layers[0:e](embed(x))                         encoder, once
    h~_t   = layers[e:d](h_{t-1})                          reasoning block, t = 1..num_loops
    h_t    = h~_1 if t == 1 else gate(h~_t, h_{t-1})       the first pass is not gated
    logits = lm_head(norm(layers[d:L](h_T)))               decoder, once

With `num_loops=1` this is exactly the base model's forward pass.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from .cache import LoopKVCache
from .checkpoint import load_checked
from .config import LoopUSConfig
from .gate import SelectiveGate
from .halting import ConfidenceHead

MASK_BUILDERS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


@dataclass
class LayerContext:
    """Everything a decoder-layer call needs besides the hidden state; built once per forward."""

    masks: dict[str, Any]
    position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]]
    position_ids: torch.LongTensor
    cache: LoopKVCache | None


@dataclass
class LoopUSCausalLMOutput(CausalLMOutputWithPast):
    """Causal-LM output plus, on request, what each loop produced.

    loop_hidden_states: the gated state h_t after each loop, num_loops tensors of (batch, seq, hidden).
    loop_confidences: the confidence head's probability per token and loop, (batch, seq, num_loops).
    gate_coefficients: the gate's mixing share `a` per loop from loop 2 on, (batch, seq, hidden) each.
    """

    loop_hidden_states: tuple[torch.Tensor, ...] | None = None
    loop_confidences: torch.Tensor | None = None
    gate_coefficients: tuple[torch.Tensor, ...] | None = None


class LoopUSForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LoopUSConfig
    config: LoopUSConfig
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: LoopUSConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        if base_model is not None:
            # Pretrained weights: post_init below must not re-initialise them.
            for module in base_model.modules():
                module._is_hf_initialized = True
            self.base = base_model
        else:
            self.base = AutoModelForCausalLM.from_config(config.base_config)
        hidden = config.base_config.hidden_size
        self.gate = SelectiveGate(hidden, config.gate_rank, config.gate_init)
        self.confidence_head = ConfidenceHead(hidden)
        self.layer_types, _ = get_layer_types_and_kwargs(config.base_config)
        rotary = self.base.model.rotary_emb
        self._rope_per_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (SelectiveGate, ConfidenceHead)):
            module.reset_parameters()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained` that refuses missing, partial or corrupt checkpoints."""
        return load_checked(super().from_pretrained, pretrained_model_name_or_path, *args, **kwargs)

    # -- the pieces of the forward pass, in order -------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.model.layers

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def new_cache(self, max_depth: int | None = None, kv_mode: str | None = None) -> LoopKVCache:
        """An empty loop-aware KV cache for up to `max_depth` loops."""
        return LoopKVCache(
            self.config.base_config,
            self.config.encoder_layers,
            self.config.decoder_layers,
            max_depth or self.config.num_loops,
            kv_mode or self.config.kv_mode,
        )

    def layer_context(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: LoopKVCache | None,
    ) -> LayerContext:
        """Masks and rotary embeddings per attention type, exactly as the base model builds them."""
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)
        base_config = self.base.config
        masks = {}
        position_embeddings = {}
        rotary = self.base.model.rotary_emb
        for layer_type in set(self.layer_types):
            masks[layer_type] = MASK_BUILDERS[layer_type](
                config=base_config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                past_key_values=cache,
                position_ids=position_ids,
            )
            if self._rope_per_layer_type:
                position_embeddings[layer_type] = rotary(inputs_embeds, position_ids, layer_type)
        if not self._rope_per_layer_type:
            shared = rotary(inputs_embeds, position_ids)
            position_embeddings = {layer_type: shared for layer_type in masks}
        return LayerContext(masks, position_embeddings, position_ids, cache)

    def run_layers(self, hidden: torch.Tensor, indices: range, ctx: LayerContext, **kwargs: Any) -> torch.Tensor:
        """Run base decoder layers `indices` in order on `hidden`."""
        for i in indices:
            layer_type = self.layer_types[i]
            hidden = self.layers[i](
                hidden,
                attention_mask=ctx.masks[layer_type],
                position_embeddings=ctx.position_embeddings[layer_type],
                position_ids=ctx.position_ids,
                past_key_values=ctx.cache,
                use_cache=ctx.cache is not None,
                **kwargs,
            )
        return hidden

    def encode(self, inputs_embeds: torch.Tensor, ctx: LayerContext, **kwargs: Any) -> torch.Tensor:
        """h_0: the encoder layers on the embeddings."""
        return self.run_layers(inputs_embeds, range(self.config.encoder_layers), ctx, **kwargs)

    def loop_step(
        self, state: torch.Tensor, ctx: LayerContext, depth: int, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pass of the reasoning block at loop `depth` (0-based), gated from the second pass on.

        Returns the new state and the gate coefficient (None for the ungated first pass).
        """
        if ctx.cache is not None:
            ctx.cache.depth = depth
        proposal = self.run_layers(state, self.config.reasoning_range, ctx, **kwargs)
        if depth == 0:
            return proposal, None
        return self.gate(proposal, state)

    def decode(self, state: torch.Tensor, ctx: LayerContext, **kwargs: Any) -> torch.Tensor:
        """The decoder layers and the final norm on the last loop state."""
        start = self.config.reasoning_range.stop
        hidden = self.run_layers(state, range(start, len(self.layers)), ctx, **kwargs)
        return self.base.model.norm(hidden)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base model's head, including Gemma's final logit soft-capping where configured."""
        logits = self.base.lm_head(hidden)
        cap = getattr(self.config.base_config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # -- the forward pass ---------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LoopKVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_loops: int | None = None,
        output_loop_states: bool = False,
        **kwargs: Any,
    ) -> LoopUSCausalLMOutput:
        num_loops = self.config.num_loops if num_loops is None else int(num_loops)
        if num_loops < 1:
            raise ValueError(f"num_loops must be >= 1, got {num_loops}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache(num_loops)
        if past_key_values is not None and not isinstance(past_key_values, LoopKVCache):
            raise TypeError(
                f"LoopUS needs a LoopKVCache (model.new_cache()), got {type(past_key_values).__name__}"
            )

        ctx = self.layer_context(inputs_embeds, attention_mask, position_ids, past_key_values)
        state = self.encode(inputs_embeds, ctx, **kwargs)
        loop_states, confidences, gate_coefficients = [], [], []
        for depth in range(num_loops):
            state, coefficient = self.loop_step(state, ctx, depth, **kwargs)
            if output_loop_states:
                loop_states.append(state)
                confidences.append(self.confidence_head(state))
                if coefficient is not None:
                    gate_coefficients.append(coefficient)
        hidden = self.decode(state, ctx, **kwargs)
        logits = self.lm_logits(slice_logits_to_keep(hidden, logits_to_keep))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.base_config.vocab_size, **kwargs)
        return LoopUSCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=past_key_values,
            loop_hidden_states=tuple(loop_states) if output_loop_states else None,
            loop_confidences=torch.stack(confidences, dim=-1) if output_loop_states else None,
            gate_coefficients=tuple(gate_coefficients) if output_loop_states else None,
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """Generation gets a LoopKVCache sized for the requested loop budget instead of a DynamicCache."""
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = self.new_cache(model_kwargs.get("num_loops"))
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
