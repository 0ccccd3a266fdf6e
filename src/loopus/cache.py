"""`LoopKVCache`: a `transformers` Cache whose slots are addressed by (base layer, loop depth).

The base model's attention modules call `cache.update(k, v, layer_idx)` with their own layer index.
The looped model sets `cache.depth` before each pass of the reasoning block, and the cache routes the
call to that depth's slot. Encoder and decoder layers have one slot each. In "per_depth" mode every
reasoning layer has `max_depth` slots, so loop t of a new token attends to loop t of earlier tokens.
In "shared" mode (MELT-like) all depths of a reasoning layer share one slot whose entries for the
current tokens are overwritten by each loop, so memory does not grow with the loop budget.

Because every slot holds the same token positions, `get_seq_length`, `get_mask_sizes`, `crop`,
`reorder_cache` and batch selection work slot by slot with the stock implementations.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, get_layer_types_and_kwargs


class LoopKVCache(Cache):
    def __init__(
        self,
        base_config: PretrainedConfig,
        encoder_layers: int,
        decoder_layers: int,
        max_depth: int,
        kv_mode: str = "per_depth",
    ):
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        layer_types, layer_kwargs = get_layer_types_and_kwargs(base_config)
        num_layers = len(layer_types)
        reasoning = range(encoder_layers, num_layers - decoder_layers)
        self.kv_mode = kv_mode
        self.max_depth = max_depth
        self.reasoning = reasoning
        depths = max_depth if kv_mode == "per_depth" else 1
        slot_bases = list(range(encoder_layers))
        for _ in range(depths):
            slot_bases.extend(reasoning)
        slot_bases.extend(range(reasoning.stop, num_layers))
        self.slot_bases = slot_bases
        self._encoder_layers = encoder_layers
        self._depths = depths
        layers = [DYNAMIC_LAYER_TYPE_MAPPING[layer_types[b]](**layer_kwargs[b]) for b in slot_bases]
        super().__init__(layers=layers)
        self.depth = 0

    def slot(self, layer_idx: int, depth: int | None = None) -> int:
        """Physical slot of base layer `layer_idx` at loop depth `depth` (default: the current one)."""
        if layer_idx < self.reasoning.start:
            return layer_idx
        if layer_idx >= self.reasoning.stop:
            return self._encoder_layers + self._depths * len(self.reasoning) + layer_idx - self.reasoning.stop
        depth = self.depth if depth is None else depth
        if depth >= self.max_depth:
            raise ValueError(
                f"this cache holds {self.max_depth} loop depths but loop {depth + 1} was requested: "
                "build the cache with a larger max_depth (the generation's num_loops)"
            )
        column = depth if self.kv_mode == "per_depth" else 0
        return self._encoder_layers + column * len(self.reasoning) + layer_idx - self.reasoning.start

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self.slot(layer_idx)
        if self.kv_mode == "shared" and self.depth > 0 and self.reasoning.start <= layer_idx < self.reasoning.stop:
            # Later loops refine the entries the first loop appended for these tokens.
            self.layers[slot].crop(-key_states.shape[-2])
        return super().update(key_states, value_states, slot, *args, **kwargs)
