"""`LoopKVCache`: a `transformers` Cache whose slots are addressed by (base layer, loop depth).

Layout
    The base model's attention modules call `update(k, v, layer_idx)` with their own layer index on
    what the looped model passes them: for each pass, a view `cache.at(depth, rows, probe)` that names
    the loop depth, the batch rows computing it and whether it is a probe, so the cache routes the
    call to the right slot. Encoder and decoder layers have
    one slot each. Every slot is a stock `DynamicLayer` / `DynamicSlidingWindowLayer`, and every slot
    always holds every token position, so `get_seq_length`, `get_mask_sizes`, `crop`,
    `reorder_cache` (beam search), `batch_repeat_interleave` and `batch_select_indices` work slot by
    slot with the stock implementations.

kv_mode="per_depth" (default)
    Every reasoning layer has `num_loops` slots: loop t of a new token attends to loop t of the
    earlier tokens. At a fixed budget this is exactly the uncached computation (tested).
    Memory grows linearly with `num_loops`.

kv_mode="shared" (constant memory, MELT-like)
    Each reasoning layer has ONE slot for all depths. While a forward loops, each pass attends to the
    stored past plus its own new entry; after the loop the deepest entry is stored, so earlier tokens
    are always seen through the KV of the deepest loop they ran. The bytes held do not depend on the loop budget
    (tested); the price is that it is not the uncached computation for budgets > 1 (its perplexity
    cost is measured in `bench/decode.py`). With one loop both modes are identical.

Tokens that exit early (adaptive depth)
    A token that stopped looping after depth d (0-based; it ran d+1 passes) has no computed KV for
    depths above d. Its entry at every depth d' > d is DEFINED as a copy of its entry at depth d,
    the latest depth it computed (Huginn's "latest available depth"). So a later token that loops
    deeper attends to the earlier token's most refined KV. In "shared" mode this holds by
    construction (the entry simply stays at depth d). When a whole forward stops before
    `num_loops`, its `with cache.forward()` block writes those copies into the remaining per-depth slots
    on leaving, so every slot keeps every position. In a batch where only some rows still loop, the view's `rows` (indices into
    the batch) says which rows the reasoning layers are computing; the cache builds the full-batch entry
    from the rows' new KV and the other rows' latest KV, stores it, and returns the keys/values of
    the active rows only, so exited rows do no attention or MLP work.

Decoder probes
    The `kl` exit strategy needs the next-token distribution after intermediate loops, i.e. a pass
    of the decoder layers that must not be stored. Through a view with `probe=True`, decoder-layer updates
    return the past KV plus the new entries without storing anything.

Per-token loop passes
    `loop_passes` (batch, seq_len) records how many reasoning passes each cached position ran;
    `loop_stats()` gives their mean and histogram (over generation: `loopus.compat.output_cache` of
    `generate(..., return_dict_in_generate=True)`, or a cache you pass in).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, get_layer_types_and_kwargs

from .deprecation import renamed_keyword
from .options import KV_MODES


def loop_stats(passes: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """Mean and histogram {passes: count} of a tensor of per-token loop-pass counts (mask selects tokens)."""
    values = passes[mask.bool()] if mask is not None else passes.flatten()
    if values.numel() == 0:
        return {"tokens": 0, "mean": float("nan"), "histogram": {}}
    counts = torch.bincount(values.long().cpu())
    histogram = {n: int(c) for n, c in enumerate(counts.tolist()) if c > 0}
    return {"tokens": int(values.numel()), "mean": float(values.float().mean()), "histogram": histogram}


class LoopForward:
    """What one model forward leaves in the cache before it is stored: the newest KV of every reasoning
    layer, the loop depths written, and (set by the forward) the passes its tokens ran."""

    def __init__(self) -> None:
        self.latest: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.depths_run = 0
        self.loop_passes: torch.LongTensor | None = None


class LoopKVCache(Cache):
    def __init__(
        self,
        base_config: PretrainedConfig,
        encoder_layers: int,
        decoder_layers: int,
        num_loops: int | None = None,
        kv_mode: str = "per_depth",
        *,
        max_depth: int | None = None,
    ):
        num_loops = renamed_keyword("LoopKVCache", "max_depth", "num_loops", max_depth, num_loops)
        if isinstance(num_loops, bool) or not isinstance(num_loops, numbers.Integral):
            raise ValueError(f"num_loops must be an integer, got {num_loops!r} ({type(num_loops).__name__})")
        if num_loops < 1:
            raise ValueError(f"num_loops must be >= 1, got {num_loops}")
        if kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode must be one of {KV_MODES}, got {kv_mode!r}")
        layer_types, layer_kwargs = get_layer_types_and_kwargs(base_config)
        num_layers = len(layer_types)
        reasoning = range(encoder_layers, num_layers - decoder_layers)
        self.kv_mode = kv_mode
        self.num_loops = num_loops
        self.reasoning = reasoning
        depths = num_loops if kv_mode == "per_depth" else 1
        slot_bases = list(range(encoder_layers))
        for _ in range(depths):
            slot_bases.extend(reasoning)
        slot_bases.extend(range(reasoning.stop, num_layers))
        self.slot_bases = slot_bases
        self._encoder_layers = encoder_layers
        self._depths = depths
        layers = [DYNAMIC_LAYER_TYPE_MAPPING[layer_types[b]](**layer_kwargs[b]) for b in slot_bases]
        super().__init__(layers=layers)
        self.loop_passes: torch.LongTensor | None = None
        self._forward: LoopForward | None = None  # the open `forward()` block, if any

    # -- addressing -------------------------------------------------------------------------------

    def slot(self, layer_idx: int, depth: int = 0) -> int:
        """Physical slot of base layer `layer_idx` at loop depth `depth` (0-based; ignored outside the block)."""
        if layer_idx < self.reasoning.start:
            return layer_idx
        if layer_idx >= self.reasoning.stop:
            return self._encoder_layers + self._depths * len(self.reasoning) + layer_idx - self.reasoning.stop
        if depth >= self.num_loops:
            raise ValueError(
                f"this cache holds {self.num_loops} loop depths but loop {depth + 1} was requested: "
                "build the cache with a larger num_loops (the generation's num_loops)"
            )
        column = depth if self.kv_mode == "per_depth" else 0
        return self._encoder_layers + column * len(self.reasoning) + layer_idx - self.reasoning.start

    def check_budget(self, num_loops: int, kv_mode: str | None = None) -> None:
        """Refuse, before any work, a forward that needs more depths than this cache holds."""
        if num_loops > self.num_loops:
            raise ValueError(
                f"the cache was built for {self.num_loops} loops but num_loops={num_loops} was requested: "
                f"pass a cache from model.new_cache({num_loops}) or lower num_loops"
            )
        if kv_mode is not None and kv_mode != self.kv_mode:
            raise ValueError(f"kv_mode={kv_mode!r} was requested but the cache passed in is {self.kv_mode!r}")

    # -- the hot path -------------------------------------------------------------------------------

    def at(self, depth: int | None = None, rows: torch.LongTensor | None = None, probe: bool = False) -> "CacheView":
        """What one pass of layer calls writes to: loop `depth` (0-based; None for encoder/decoder calls),
        the batch `rows` computing it (None: all), and `probe` (decoder calls that store nothing)."""
        return CacheView(self, depth, rows, probe)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stock `Cache.update` for encoder and decoder layers; reasoning layers go through `at(depth)`."""
        if self.reasoning.start <= layer_idx < self.reasoning.stop:
            raise ValueError(
                f"layer {layer_idx} is a reasoning layer: its KV depends on the loop depth, so write through "
                "cache.at(depth, rows) (LoopUSForCausalLM does this for its layers)"
            )
        return super().update(key_states, value_states, self.slot(layer_idx), *args, **kwargs)

    def write(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        depth: int | None,
        rows: torch.LongTensor | None,
        probe: bool,
        *args,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (or, for probes, only show) one layer call's KV and return what its attention reads."""
        if not self.reasoning.start <= layer_idx < self.reasoning.stop:
            if probe:
                return self._peek(self.slot(layer_idx), key_states, value_states, rows)
            return self.update(key_states, value_states, layer_idx, *args, **kwargs)
        if depth is None:
            raise ValueError(f"layer {layer_idx} is a reasoning layer: the call must name its loop depth")
        if self._forward is None:
            raise ValueError("reasoning-layer KV is written inside `with cache.forward():` (LoopUSForCausalLM "
                             "opens it for every forward)")
        slot = self.slot(layer_idx, depth)
        latest = self._forward.latest
        if rows is None:
            latest[layer_idx] = (key_states, value_states)
        else:  # exited rows keep their latest entry; the active rows bring their new one
            latest_k, latest_v = latest[layer_idx]
            latest[layer_idx] = (latest_k.index_copy(0, rows, key_states), latest_v.index_copy(0, rows, value_states))
        self._forward.depths_run = max(self._forward.depths_run, depth + 1)
        if self.kv_mode == "shared":
            # One slot for every depth: until the forward block stores the deepest entry, each pass sees the
            # stored past plus its own new entry.
            return self._peek(slot, key_states, value_states, rows)
        keys, values = super().update(*latest[layer_idx], slot, *args, **kwargs)
        if rows is not None:
            keys, values = keys.index_select(0, rows), values.index_select(0, rows)
        return keys, values

    def _peek(self, slot: int, key_states: torch.Tensor, value_states: torch.Tensor, rows: torch.LongTensor | None):
        """Past KV of `slot` (for `rows`) plus the new entries of `rows`, as a stored update returns them; stores nothing."""
        layer = self.layers[slot]
        if not layer.is_initialized or layer.keys.numel() == 0:
            return key_states, value_states
        keys, values = layer.keys, layer.values
        if rows is not None:
            keys, values = keys.index_select(0, rows), values.index_select(0, rows)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    @contextlib.contextmanager
    def forward(self) -> Iterator[LoopForward]:
        """One model forward's writes. Inside, the reasoning passes write through `at(depth, rows)`; the
        forward sets the yielded state's `loop_passes` (batch, seq) once its loop is done. On leaving, the
        newest KV is stored where no pass wrote it (the depths nobody ran; in shared mode the one slot)
        and the passes are recorded; a forward that fails records no passes."""
        if self._forward is not None:
            raise RuntimeError("a forward is already writing to this cache: one forward at a time")
        state = self._forward = LoopForward()
        try:
            yield state
        finally:
            self._forward = None
        if state.loop_passes is None:
            raise RuntimeError("the forward left `with cache.forward()` without setting loop_passes")
        first_unwritten = 0 if self.kv_mode == "shared" else state.depths_run
        for depth in range(first_unwritten, self._depths):
            for layer_idx in self.reasoning:
                if layer_idx in state.latest:
                    super().update(*state.latest[layer_idx], self.slot(layer_idx, depth))
        passes = state.loop_passes.to(torch.long)
        self.loop_passes = passes if self.loop_passes is None else torch.cat([self.loop_passes, passes], dim=-1)

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
        self._forward = None

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


class CacheView:
    """One pass of layer calls, addressed: the base attention modules call `update(k, v, layer_idx)` on this
    view, and it tells the cache the loop depth, the batch rows and whether the pass is a probe."""

    def __init__(self, cache: LoopKVCache, depth: int | None, rows: torch.LongTensor | None, probe: bool):
        self.cache, self.depth, self.rows, self.probe = cache, depth, rows, probe

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.cache.write(key_states, value_states, layer_idx, self.depth, self.rows, self.probe, *args, **kwargs)
