"""The looped-model contract: the pieces a looped model offers to training, evaluation and sharding.

`LoopUSForCausalLM` is one (it subclasses `LoopedModel`); `OneLoop` lets a plain causal LM take part
with one loop and nothing to loop, so the training step and validation have no dense branch of their own.
The forward pass of a looped model, in pieces:

    embeds = embed(input_ids);  ctx = layer_context(embeds, ...)
    h_0    = encode(embeds, ctx)
    h_t, _ = loop_step(h_{t-1}, ctx, t - 1)        t = 1..T  (`run_loop` drives these passes)
    logits = lm_logits(decode(h_t, ctx))

Random deep supervision calls the pieces one by one. Under FSDP a piece that is not the forward of a
sharded unit must be registered as a forward method of the root: those are `ROOT_PIECES`.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import nn


class LoopedModel:
    """Base class naming the contract; the methods here are what `rds_step`, `evaluate` and `shard_model` call."""

    # the pieces run on the root module itself (not inside a layer, the gate or the confidence head)
    ROOT_PIECES = ("embed", "decode", "lm_logits")

    confidence_head: nn.Module | None  # q_t from h_t (`.logits` for the training loss); None: no exit head

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        raise NotImplementedError

    def layer_context(self, inputs_embeds: torch.Tensor, attention_mask, position_ids, cache) -> Any:
        raise NotImplementedError

    def encode(self, inputs_embeds: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def loop_step(self, state: torch.Tensor, ctx: Any, depth: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def decode(self, state: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_loop_hidden(self, input_ids: torch.LongTensor,
                        loops: Iterable[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(n, h_n, final-normed decoder output) at each loop count of `loop_counts(loops)`, no cache."""
        raise NotImplementedError

    def loop_counts(self, loops: Iterable[int]) -> list[int]:
        """The loop counts this model can be evaluated at, of those asked for."""
        return sorted(set(int(n) for n in loops))

    def front_modules(self) -> list[nn.Module]:
        """The modules `embed` and `encode` run (before the loop): they need gradient only if one trains."""
        return [self.get_input_embeddings(), *[self.layers[i] for i in range(self.config.encoder_layers)]]


class OneLoop(LoopedModel):
    """A plain causal LM seen as a looped model with one loop: `encode` runs the whole model through its
    root `forward` (which is what lets FSDP gather the root's parameters), the loop step and `decode` pass
    the state through, and there is no confidence head."""

    confidence_head = None

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    def embed(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        return input_ids  # the root forward embeds

    def layer_context(self, inputs_embeds, attention_mask=None, position_ids=None, cache=None) -> None:
        return None

    def encode(self, input_ids: torch.LongTensor, ctx: None) -> torch.Tensor:
        """Final-normed hidden states; the head is applied to no position here (the loss chunks it)."""
        no_positions = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        out = self.model(input_ids=input_ids, use_cache=False, output_hidden_states=True,
                         logits_to_keep=no_positions)
        return out.hidden_states[-1]

    def loop_step(self, state: torch.Tensor, ctx: None, depth: int) -> tuple[torch.Tensor, None]:
        return state, None

    def decode(self, state: torch.Tensor, ctx: None) -> torch.Tensor:
        return state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        cap = getattr(self.config, "final_logit_softcapping", None)
        logits = self.model.get_output_embeddings()(hidden)
        return torch.tanh(logits / cap) * cap if cap is not None else logits

    def per_loop_hidden(self, input_ids, loops) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        hidden = self.encode(input_ids, None)
        yield 1, hidden, hidden

    def loop_counts(self, loops: Iterable[int]) -> list[int]:
        return [1]

    def front_modules(self) -> list[nn.Module]:
        return [self.model]


def looped_view(model: nn.Module) -> LoopedModel:
    """`model` itself where it is a looped model, else its one-loop view."""
    return model if isinstance(model, LoopedModel) else OneLoop(model)
