"""`LoopKVCache`: a `transformers` Cache whose slots are addressed by (base layer, loop depth).

Layout
    The base model's attention modules call `cache.update(k, v, layer_idx)` with their own layer index.
    The looped model sets `cache.depth` (and `cache.active_rows`, see below) before each pass of the
    reasoning block and the cache routes the call to the right slot. Encoder and decoder layers have
    one slot each. Every slot is a stock `DynamicLayer` / `DynamicSlidingWindowLayer`, and every slot
    always holds every token position, so `get_seq_length`, `get_mask_sizes`, `crop`,
    `reorder_cache` (beam search), `batch_repeat_interleave` and `batch_select_indices` work slot by
    slot with the stock implementations.

kv_mode="per_depth" (default)
    Every reasoning layer has `max_depth` slots: loop t of a new token attends to loop t of the
    earlier tokens. At a fixed budget this is exactly the uncached computation (tested).
    Memory grows linearly with `max_depth`.

kv_mode="shared" (constant memory, MELT-like)
    Each reasoning layer has ONE slot for all depths. Loop 1 of a new token appends its entry; each
    later loop overwrites that same entry with the refined one, so earlier tokens are always seen
    through the KV of the deepest loop they ran. The bytes held do not depend on the loop budget
    (tested); the price is that it is not the uncached computation for budgets > 1 (its perplexity
    cost is measured in `bench/decode.py`). With one loop both modes are identical.

Tokens that exit early (adaptive depth)
    A token that stopped looping after depth d (0-based; it ran d+1 passes) has no computed KV for
    depths above d. Its entry at every depth d' > d is DEFINED as a copy of its entry at depth d,
    the latest depth it computed (Huginn's "latest available depth"). So a later token that loops
    deeper attends to the earlier token's most refined KV. In "shared" mode this holds by
    construction (the entry simply stays at depth d). When a whole forward stops before
    `max_depth`, `finish_loops` writes those copies into the remaining per-depth slots, so every slot
    keeps every position. In a batch where only some rows still loop, `active_rows` (indices into the
    batch) says which rows the reasoning layers are computing; the cache builds the full-batch entry
    from the rows' new KV and the other rows' latest KV, stores it, and returns the keys/values of
    the active rows only, so exited rows do no attention or MLP work.

Decoder probes
    The `kl` exit strategy needs the next-token distribution after intermediate loops, i.e. a pass
    of the decoder layers that must not be stored. While `probe` is True, decoder-layer updates
    return the past KV plus the new entries without storing anything.

Per-token loop passes
    `loop_passes` (batch, seq_len) records how many reasoning passes each cached position ran;
    `loop_stats()` gives their mean and histogram (over generation: `loopus.compat.output_cache` of
    `generate(..., return_dict_in_generate=True)`, or a cache you pass in).
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, get_layer_types_and_kwargs

KV_MODES = ("per_depth", "shared")


def loop_stats(passes: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """Mean and histogram {passes: count} of a tensor of per-token loop-pass counts (mask selects tokens)."""
    values = passes[mask.bool()] if mask is not None else passes.flatten()
    if values.numel() == 0:
        return {"tokens": 0, "mean": float("nan"), "histogram": {}}
    counts = torch.bincount(values.long().cpu())
    histogram = {n: int(c) for n, c in enumerate(counts.tolist()) if c > 0}
    return {"tokens": int(values.numel()), "mean": float(values.float().mean()), "histogram": histogram}


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
        if kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode must be one of {KV_MODES}, got {kv_mode!r}")
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
        self.active_rows: torch.LongTensor | None = None
        self.probe = False
        self.loop_passes: torch.LongTensor | None = None
        self._latest: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._before_forward: dict[int, tuple] = {}

    # -- addressing -------------------------------------------------------------------------------

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

    def check_budget(self, num_loops: int, kv_mode: str | None = None) -> None:
        """Refuse, before any work, a forward that needs more depths than this cache holds."""
        if num_loops > self.max_depth:
            raise ValueError(
                f"the cache was built for {self.max_depth} loops but num_loops={num_loops} was requested: "
                f"pass a cache from model.new_cache({num_loops}) or lower num_loops"
            )
        if kv_mode is not None and kv_mode != self.kv_mode:
            raise ValueError(f"kv_mode={kv_mode!r} was requested but the cache passed in is {self.kv_mode!r}")

    # -- the hot path -------------------------------------------------------------------------------

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.reasoning.start <= layer_idx < self.reasoning.stop:
            slot = self.slot(layer_idx)
            if self.probe and layer_idx >= self.reasoning.stop:
                return self._peek(slot, key_states, value_states)
            return super().update(key_states, value_states, slot, *args, **kwargs)

        rows = self.active_rows
        if rows is not None:
            # Exited rows keep their latest entry; the active rows bring their new one.
            latest_k, latest_v = self._latest[layer_idx]
            key_states = latest_k.index_copy(0, rows, key_states)
            value_states = latest_v.index_copy(0, rows, value_states)
        self._latest[layer_idx] = (key_states, value_states)

        slot = self.slot(layer_idx)
        layer = self.layers[slot]
        if self.kv_mode == "shared":
            if self.depth == 0 or slot not in self._before_forward:
                self._before_forward[slot] = (layer.keys, layer.values, getattr(layer, "cumulative_length", None),
                                              layer.is_initialized)
            else:
                # A later loop replaces this forward's entries: go back to the state before them.
                keys, values, cumulative, initialized = self._before_forward[slot]
                if initialized:
                    layer.keys, layer.values = keys, values
                    if cumulative is not None:
                        layer.cumulative_length = cumulative
                else:
                    layer.reset()
        keys, values = super().update(key_states, value_states, slot, *args, **kwargs)
        if rows is not None:
            keys, values = keys.index_select(0, rows), values.index_select(0, rows)
        return keys, values

    def _peek(self, slot: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """Past KV of `slot` (active rows) plus the new entries, as `update` would return them, storing nothing."""
        layer = self.layers[slot]
        if not layer.is_initialized or layer.keys.numel() == 0:
            return key_states, value_states
        keys, values = layer.keys, layer.values
        if self.active_rows is not None:
            keys, values = keys.index_select(0, self.active_rows), values.index_select(0, self.active_rows)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def start_forward(self) -> None:
        """Called by the model before the encoder of every forward."""
        self.depth = 0
        self.active_rows = None
        self.probe = False
        self._latest.clear()
        self._before_forward.clear()

    def finish_loops(self, depths_run: int, passes: torch.LongTensor) -> None:
        """After the loop: copy the latest KV into the depths nobody ran, record per-token passes."""
        if self.kv_mode == "per_depth" and self._latest:
            self.active_rows = None
            for depth in range(depths_run, self.max_depth):
                for layer_idx in self.reasoning:
                    keys, values = self._latest[layer_idx]
                    super().update(keys, values, self.slot(layer_idx, depth))
        passes = passes.to(torch.long)
        self.loop_passes = passes if self.loop_passes is None else torch.cat([self.loop_passes, passes], dim=-1)
        self.depth = 0
        self.active_rows = None
        self._latest.clear()
        self._before_forward.clear()

    # -- what users and `generate` need -----------------------------------------------------------

    def loop_stats(self, start: int = 0, mask: torch.Tensor | None = None) -> dict:
        """Mean and histogram of reasoning passes for cached positions `start:` (e.g. the generated ones)."""
        if self.loop_passes is None:
            return loop_stats(torch.zeros(0, dtype=torch.long))
        passes = self.loop_passes[:, start:]
        return loop_stats(passes, None if mask is None else mask[:, start:])

    def kv_bytes(self) -> int:
        """Bytes held by all key/value tensors."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized and layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total

    def reset(self) -> None:
        super().reset()
        self.loop_passes = None
        self.start_forward()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.loop_passes is not None and tokens_to_remove < 0:
            self.loop_passes = self.loop_passes[:, :tokens_to_remove]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.loop_passes is not None:
            self.loop_passes = self.loop_passes.index_select(0, beam_idx.to(self.loop_passes.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.loop_passes is not None:
            self.loop_passes = self.loop_passes.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.loop_passes is not None:
            self.loop_passes = self.loop_passes[indices]
