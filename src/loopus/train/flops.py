"""Model FLOPs of a training or decode step (matmul FLOPs, 2 per multiply-add), for time ratios and MFU.

Per token and layer the forward costs 2 * (linear weights) + attention (4 * head_dim * heads per key
attended: s/2 keys on average in a causal pass over s positions, the whole context in a decode step).
A backward costs 2x its forward where weights train (input and weight gradients) and 1x where only
the input gradient is needed. Frozen front layers (embeddings, encoder) cost a forward only. The
chunked cross entropy recomputes the head in the backward (+1 forward), as does gradient
checkpointing for every layer with gradient.
"""

from __future__ import annotations

import torch

from .objective import RDSConfig, sample_plan


def layer_flops(config, context: float) -> float:
    """Forward FLOPs of one transformer layer for one token attending to `context` keys."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", heads)
    inter = config.intermediate_size
    linear = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h + 3 * h * inter
    return 2 * linear + 4 * heads * head_dim * context


def head_flops(config) -> int:
    """Forward FLOPs of the LM head for one token."""
    return 2 * config.hidden_size * config.vocab_size


def per_token_costs(config, seq_len: int) -> tuple[float, float]:
    """(forward FLOPs of one transformer layer, forward FLOPs of the LM head) per token of a causal pass
    over `seq_len` positions, where a token attends to `seq_len / 2` keys on average."""
    return layer_flops(config, seq_len / 2), head_flops(config)


def decode_step_flops(config, budget: int, context: int) -> float:
    """FLOPs of one cached decode step of a LoopUS model (`config`: its `LoopUSConfig`) at `budget` loops,
    the new token attending to `context` keys: encoder + budget x reasoning + decoder layers, the head."""
    base = config.base_config
    passes = config.encoder_layers + budget * len(config.reasoning_range) + config.decoder_layers
    return passes * layer_flops(base, context) + head_flops(base)


def dense_step_flops(config, seq_len: int, frozen_front_layers: int = 0, gradient_checkpointing: bool = False,
                     head_trains: bool = False) -> float:
    layer, head = per_token_costs(config, seq_len)
    n = config.num_hidden_layers
    trained = n - frozen_front_layers
    total = layer * n + 2 * layer * trained + (layer * trained if gradient_checkpointing else 0)
    return total + head * (3 + (1 if head_trains else 0))


def rds_step_flops(config, seq_len: int, encoder: int, decoder: int, rds: RDSConfig = RDSConfig(),
                   gradient_checkpointing: bool = False, samples: int = 4000, head_trains: bool = False,
                   weights_train: bool = True) -> float:
    """Expected FLOPs per token of one RDS step (encoder frozen), averaged over the plans `rds` draws (over
    the whole run, for a horizon draw that ramps up)."""
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    for i in range(samples):
        plan = sample_plan(generator, rds, progress=(i + 0.5) / samples)
        total += plan_flops(config, seq_len, encoder, decoder, plan, gradient_checkpointing, head_trains, weights_train)
    return total / samples


def plan_flops(config, seq_len: int, encoder: int, decoder: int, plan, gradient_checkpointing: bool = False,
               head_trains: bool = False, weights_train: bool = True) -> float:
    """FLOPs per token of one RDS step with a given plan (encoder frozen). `weights_train=False`: the
    reasoning and decoder weights are frozen (depth adapters train), so their backward is the input
    gradient only; the adapters' own low-rank matmuls are left out."""
    layer, head = per_token_costs(config, seq_len)
    reasoning = config.num_hidden_layers - encoder - decoder
    backward = 2 if weights_train else 1
    with_grad = sum(plan.grad_mask())
    fwd = layer * (encoder + reasoning * plan.horizon)
    bwd = backward * layer * reasoning * with_grad + (layer * reasoning * with_grad if gradient_checkpointing else 0)
    dec = len(plan.supervised) * (layer * decoder * (1 + backward + (1 if gradient_checkpointing else 0))
                                  + head * (3 + (1 if head_trains else 0)))
    return fwd + bwd + dec


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s by device name


def peak_flops() -> float | None:
    """This GPU's dense bf16 peak in FLOP/s, for model-FLOPs utilisation; None on a CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
