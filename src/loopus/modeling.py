"""`LoopUSForCausalLM`: a pretrained causal LM run as encoder -> looped reasoning block -> decoder.

The wrapped model (`self.base`, e.g. a `Gemma3ForCausalLM`) keeps its own modules and weights; this
class only decides the order in which its decoder layers run:

    h_0    = layers[0:e](embed(x))                         encoder, once
    h~_t   = layers[e:d](h_{t-1} [+ W h_0 for t > 1])     reasoning block, t = 1..num_loops (injection.py)
    h_t    = h~_1 if t == 1 else gate(h~_t, h_{t-1})       the first pass is not gated
    logits = lm_head(norm(layers[d:L](h_T)))               decoder, once

With `num_loops=1` this is exactly the base model's forward pass.

Adaptive depth (`exit_strategy=` one of threshold / cdf / convergence / kl, see `halting.py`): after
each pass from `min_loops` on, every token is tested; a batch row whose query tokens have all met
the rule leaves the loop, and the following passes run the reasoning block on the remaining rows
only (gathered with `index_select`, written back with `index_copy`), so exited rows do no further
reasoning-layer work. The output's `loop_passes` counts the passes of every token.

The rule applies to decode steps: one query token appended to a cache that already holds the
sequence so far. Prefill (the prompt in `generate`, whatever its length, or any forward without a
cache) runs the full budget for every token by default, so the prompt's KV is exact at every depth
and a prompt gets the same passes alone as in a padded batch. With `prefill_exit=True` the rule
applies to those forwards as well, per sequence: a row stops when all of its non-padding tokens have
met it. A forward that asks for adaptive exit where it could never apply (no cache and no
`prefill_exit`) is refused.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import slice_logits_to_keep

from .adapters import adapter_name, adapters_disabled, inject_depth_adapters, select_adapter
from .cache import CacheView, LoopKVCache
from .checkpoint import load_checked
from .compat import GENERATION_CACHE_KWARG, MASK_CACHE_KWARG, OUTPUT_CACHE_FIELD, cache_kwarg
from .config import LoopUSConfig, check_int, check_num_loops
from .deprecation import renamed_keyword
from .gate import SelectiveGate
from .halting import ConfidenceHead, ExitRule, ExitTracker
from .injection import InputInjection
from .looped import LoopedModel
from .outputs import LoopUSCausalLMOutput

MASK_BUILDERS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma's final logit soft-capping, `cap * tanh(logits / cap)`; the identity where the base has none."""
    return torch.tanh(logits / cap) * cap if cap is not None else logits


@dataclass
class LayerContext:
    """Everything a decoder-layer call needs besides the hidden state; built once per forward."""

    masks: dict[str, Any]
    position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]]
    position_ids: torch.LongTensor
    cache: LoopKVCache | None
    rows: torch.LongTensor | None = None  # batch rows this context covers; None = the whole batch
    anchor: torch.Tensor | None = None  # h_0, for input injection; set by `encode`

    def select(self, rows: torch.LongTensor) -> "LayerContext":
        """The same context restricted to batch `rows` (absolute indices), for the rows still looping."""

        def pick(x):
            if x is None or x.shape[0] == 1:
                return x
            if isinstance(x, torch.Tensor):
                return x.index_select(0, rows)
            raise NotImplementedError(f"adaptive exit cannot select batch rows of a {type(x).__name__} mask")

        masks = {kind: pick(mask) for kind, mask in self.masks.items()}
        rotary = {kind: (pick(cos), pick(sin)) for kind, (cos, sin) in self.position_embeddings.items()}
        return LayerContext(masks, rotary, pick(self.position_ids), self.cache, rows, pick(self.anchor))


@dataclass
class LoopPass:
    """One pass of the reasoning block: the full-batch state h_t after it, and the gate's share `a` for
    the batch `rows` that ran it (None: all rows; the gate is None for the ungated first pass)."""

    loops: int
    state: torch.Tensor
    gate: torch.Tensor | None
    rows: torch.LongTensor | None

    def full_batch_gate(self) -> torch.Tensor:
        """The gate share for every row: 0 (the state is kept) for rows that had exited."""
        if self.rows is None:
            return self.gate
        return torch.zeros_like(self.state).index_copy(0, self.rows, self.gate)


class LoopUSForCausalLM(PreTrainedModel, GenerationMixin, LoopedModel):
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
            self.base = AutoModelForCausalLM.from_config(config.require_base_config())
        hidden = config.base_config.hidden_size
        self.gate = SelectiveGate(hidden, config.gate_rank, config.gate_init, config.gate_floor)
        self.injection = InputInjection(hidden) if config.input_injection else None
        self.confidence_head = ConfidenceHead(hidden)
        self.layer_types, _ = get_layer_types_and_kwargs(config.base_config)
        rotary = self.base.model.rotary_emb
        self._rope_per_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters
        self._layer_cache_kwarg = cache_kwarg(type(self.layers[0]).forward)
        self._depth_tuners: list[nn.Module] = []
        if config.depth_lora_rank > 0:
            self._inject_depth_adapters()
        self.post_init()

    def add_depth_adapters(self, rank: int, alpha: float | None = None, count: int | None = None) -> None:
        """Give the reasoning block depth-wise LoRA adapters that act from loop 2 on (see `loopus.adapters`);
        `count` > 1 gives loops 2..count+1 one each."""
        if self.config.depth_lora_rank:
            raise ValueError(f"this model already has depth adapters (rank {self.config.depth_lora_rank})")
        self.config.depth_lora_rank = check_int(rank, "depth_lora_rank", 1)
        if alpha is not None:
            self.config.depth_lora_alpha = float(alpha)
        if count is not None:
            self.config.depth_lora_count = check_int(count, "depth_lora_count", 1)
        self._inject_depth_adapters()

    def depth_adapter_parameters(self) -> list[nn.Parameter]:
        """The depth-wise adapters' own weights (not those of the layers they wrap)."""
        return [p for m in self._depth_tuners for n, p in m.named_parameters() if not n.startswith("base_layer.")]

    def _inject_depth_adapters(self) -> None:
        indices = list(self.config.reasoning_range)
        layers = [self.layers[i] for i in indices]
        self._depth_tuners = inject_depth_adapters(self, layers, [f"base.model.layers.{i}" for i in indices],
                                                   self.config.depth_lora_rank, self.config.depth_lora_alpha,
                                                   self.config.depth_lora_count)
        for module in self._depth_tuners:  # PEFT initialised them (B = 0): post_init must not redo it
            for sub in module.modules():
                sub._is_hf_initialized = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (SelectiveGate, ConfidenceHead, InputInjection)):
            module.reset_parameters()
        elif module is getattr(self.__dict__.get("_modules", {}).get("confidence_head"), "proj", None):
            # For non-library models transformers marks a module that has no parameters of its own (the
            # ConfidenceHead) initialised without calling this, so its Linear is initialised here.
            self.confidence_head.reset_parameters()

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

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Token embeddings (with the base model's own scaling, e.g. Gemma's sqrt(hidden))."""
        return self.get_input_embeddings()(input_ids)

    def new_cache(self, num_loops: int | None = None, kv_mode: str | None = None, *,
                  max_depth: int | None = None) -> LoopKVCache:
        """An empty loop-aware KV cache for up to `num_loops` loops (default: the config's)."""
        num_loops = renamed_keyword("new_cache", "max_depth", "num_loops", max_depth, num_loops)
        num_loops = self.config.num_loops if num_loops is None else check_num_loops(num_loops)
        cfg = self.config
        return LoopKVCache(cfg.base_config, cfg.encoder_layers, cfg.decoder_layers, num_loops, kv_mode or cfg.kv_mode)

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
                position_ids=position_ids,
                **{MASK_CACHE_KWARG: cache},
            )
            if self._rope_per_layer_type:
                position_embeddings[layer_type] = rotary(inputs_embeds, position_ids, layer_type)
        if not self._rope_per_layer_type:
            shared = rotary(inputs_embeds, position_ids)
            position_embeddings = {layer_type: shared for layer_type in masks}
        return LayerContext(masks, position_embeddings, position_ids, cache)

    def run_layers(self, hidden: torch.Tensor, indices: range, ctx: LayerContext,
                   cache: LoopKVCache | CacheView | None, **kwargs: Any) -> torch.Tensor:
        """Run base decoder layers `indices` in order on `hidden`; their KV goes to `cache` (the cache itself
        for encoder and decoder layers, a `cache.at(depth, rows)` view for a pass of the reasoning block)."""
        for i in indices:
            layer_type = self.layer_types[i]
            hidden = self.layers[i](
                hidden,
                attention_mask=ctx.masks[layer_type],
                position_embeddings=ctx.position_embeddings[layer_type],
                position_ids=ctx.position_ids,
                use_cache=cache is not None,
                **{self._layer_cache_kwarg: cache},
                **kwargs,
            )
        return hidden

    def encode(self, inputs_embeds: torch.Tensor, ctx: LayerContext, **kwargs: Any) -> torch.Tensor:
        """h_0: the encoder layers on the embeddings (kept in `ctx` as the anchor of input injection)."""
        ctx.anchor = self.run_layers(inputs_embeds, range(self.config.encoder_layers), ctx, ctx.cache, **kwargs)
        return ctx.anchor

    def loop_step(
        self, state: torch.Tensor, ctx: LayerContext, depth: int, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pass of the reasoning block at loop `depth` (0-based), gated from the second pass on.

        Returns the new state and the gate coefficient (None for the ungated first pass).
        """
        cache = None if ctx.cache is None else ctx.cache.at(depth, ctx.rows)
        if depth == 0:
            # the first pass is the base model's block: no gate, and no depth-wise adapters
            with adapters_disabled(self._depth_tuners):
                return self.run_layers(state, self.config.reasoning_range, ctx, cache, **kwargs), None
        if self.config.depth_lora_count > 1 and self._depth_tuners:
            select_adapter(self._depth_tuners, adapter_name(depth + 1, self.config.depth_lora_count))
        block_input = state if self.injection is None else state + self.injection(ctx.anchor)
        proposal = self.run_layers(block_input, self.config.reasoning_range, ctx, cache, **kwargs)
        return self.gate(proposal, state)

    def run_loop(self, state: torch.Tensor, ctx: LayerContext, num_loops: int, tracker: ExitTracker | None = None,
                 **kwargs: Any) -> Iterator[LoopPass]:
        """The loop: passes of the reasoning block from h_0, yielding h_t for t = 1..num_loops.

        With a `tracker` (adaptive exit), a batch row leaves once all its tokens have met the exit rule,
        later passes run on the remaining rows only, and the loop ends when none is left.
        """
        for depth in range(num_loops):
            rows = None if tracker is None else tracker.active
            step_ctx = ctx if rows is None else ctx.select(rows)
            previous = state if rows is None else state.index_select(0, rows)
            new, coefficient = self.loop_step(previous, step_ctx, depth, **kwargs)
            state = new if rows is None else state.index_copy(0, rows, new)
            if tracker is not None:
                tracker.count_pass()
            yield LoopPass(depth + 1, state, coefficient, rows)
            if tracker is None or depth + 1 == num_loops:
                continue
            confidence = self.confidence_head(new) if tracker.rule.needs_confidence else None
            logprobs = self.probe_logprobs(new, step_ctx, **kwargs) if tracker.wants_distribution(depth + 1) else None
            if not tracker.update(depth + 1, new, previous, confidence, logprobs):
                return

    @torch.no_grad()
    def per_loop_hidden(self, input_ids: torch.LongTensor, loops: Iterable[int],
                        attention_mask: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(n, h_n, final-normed decoder output) at each loop count in `loops`, without a cache: one encoder
        pass, one loop to the largest count, the decoder after each requested one (evaluation, perplexity)."""
        wanted = set(int(n) for n in loops)
        embeds = self.embed(input_ids)
        ctx = self.layer_context(embeds, attention_mask, None, None)
        for step in self.run_loop(self.encode(embeds, ctx), ctx, max(wanted)):
            if step.loops in wanted:
                yield step.loops, step.state, self.decode(step.state, ctx)

    def decode(self, state: torch.Tensor, ctx: LayerContext, probe: bool = False, **kwargs: Any) -> torch.Tensor:
        """The decoder layers and the final norm on a loop state; a `probe` stores nothing in the cache."""
        cache = ctx.cache.at(rows=ctx.rows, probe=True) if probe and ctx.cache is not None else ctx.cache
        start = self.config.reasoning_range.stop
        hidden = self.run_layers(state, range(start, len(self.layers)), ctx, cache, **kwargs)
        return self.base.model.norm(hidden)

    def probe_logprobs(self, state: torch.Tensor, ctx: LayerContext, **kwargs: Any) -> torch.Tensor:
        """Next-token log-probabilities decoded from an intermediate loop state; writes nothing to the cache."""
        return torch.log_softmax(self.lm_logits(self.decode(state, ctx, probe=True, **kwargs)).float(), dim=-1)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base model's head, including Gemma's final logit soft-capping where configured."""
        return soft_cap(self.base.lm_head(hidden), getattr(self.config.base_config, "final_logit_softcapping", None))

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
        exit_strategy: str | None = None,
        exit_threshold: float | None = None,
        min_loops: int | None = None,
        prefill_exit: bool = False,
        kv_mode: str | None = None,
        cache: LoopKVCache | None = None,
        **kwargs: Any,
    ) -> LoopUSCausalLMOutput:
        """Encoder, then up to `num_loops` passes of the reasoning block, then decoder and head.

        num_loops: the loop budget (max loops). exit_strategy / exit_threshold / min_loops: per-token
        adaptive exit (`halting.py`); None runs exactly `num_loops` passes. prefill_exit: apply the
        exit rule to multi-token forwards too (per sequence). kv_mode: "per_depth" or "shared" for the
        cache this call builds (a cache passed in must match). cache / past_key_values: the KV cache,
        under either name (transformers >= 5.24 passes `cache`, earlier releases `past_key_values`).
        """
        num_loops = self.config.num_loops if num_loops is None else check_num_loops(num_loops)
        exit_rule = ExitRule.build(exit_strategy, exit_threshold, min_loops, num_loops)
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("two different caches were passed (as `cache` and `past_key_values`): pass one")
        past_key_values = past_key_values if past_key_values is not None else cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache(num_loops, kv_mode)
        if past_key_values is not None:
            if not isinstance(past_key_values, LoopKVCache):
                raise TypeError(
                    f"LoopUS needs a LoopKVCache (model.new_cache()), got {type(past_key_values).__name__}"
                )
            past_key_values.check_budget(num_loops, kv_mode)
        decode_step = past_key_values is not None and past_key_values.get_seq_length() > 0
        if exit_rule is not None and past_key_values is None and not prefill_exit:
            raise ValueError(
                "adaptive exit applies to cached decode steps: this forward has no KV cache, so the rule would "
                "never fire; pass use_cache=True (generate's default), or prefill_exit=True to apply it here"
            )

        ctx = self.layer_context(inputs_embeds, attention_mask, position_ids, past_key_values)
        loop_states, confidences, gate_coefficients = [], [], []
        with past_key_values.forward() if past_key_values is not None else contextlib.nullcontext() as writes:
            state = self.encode(inputs_embeds, ctx, **kwargs)
            batch, seq = state.shape[:2]
            tracker = None
            if exit_rule is not None and ((seq == 1 and decode_step) or prefill_exit):
                tracker = ExitTracker(exit_rule, batch, seq, state.device, attention_mask)
            for step in self.run_loop(state, ctx, num_loops, tracker, **kwargs):
                state = step.state
                if output_loop_states:
                    loop_states.append(state)
                    confidences.append(self.confidence_head(state))
                    if step.gate is not None:
                        gate_coefficients.append(step.full_batch_gate())
            passes = tracker.passes if tracker is not None else torch.full((batch,), step.loops, device=state.device)
            loop_passes = passes.unsqueeze(-1).expand(batch, seq)
            if writes is not None:
                writes.loop_passes = loop_passes

        hidden = self.decode(state, ctx, **kwargs)
        logits = self.lm_logits(slice_logits_to_keep(hidden, logits_to_keep))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.base_config.vocab_size, **kwargs)
        return LoopUSCausalLMOutput(
            loss=loss,
            logits=logits,
            **{OUTPUT_CACHE_FIELD: past_key_values},
            loop_hidden_states=tuple(loop_states) if output_loop_states else None,
            loop_confidences=torch.stack(confidences, dim=-1) if output_loop_states else None,
            gate_coefficients=tuple(gate_coefficients) if output_loop_states else None,
            last_hidden_state=hidden,
            loop_passes=loop_passes,
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """Generation gets a LoopKVCache sized for the requested loop budget instead of a DynamicCache.

        Also refuses the settings under which adaptive exit would silently not apply.
        """
        if model_kwargs.get("exit_strategy") is not None:
            if generation_config.use_cache is False:
                raise ValueError(
                    "exit_strategy needs the KV cache: with use_cache=False every step recomputes the whole "
                    "sequence at the full loop budget; drop use_cache=False or the exit strategy"
                )
            if generation_config.prompt_lookup_num_tokens or generation_config.assistant_early_exit:
                raise ValueError(
                    "exit_strategy cannot be combined with prompt_lookup_num_tokens / assisted decoding: "
                    "candidates are verified in multi-token forwards at the full loop budget"
                )
        if model_kwargs.get(GENERATION_CACHE_KWARG) is None and generation_config.use_cache is not False:
            model_kwargs[GENERATION_CACHE_KWARG] = self.new_cache(model_kwargs.get("num_loops"), model_kwargs.get("kv_mode"))
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
