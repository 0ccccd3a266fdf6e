"""FSDP2 for training: parameters, gradients and optimiser state sharded across processes.

Random deep supervision does not run the model's `forward`: it calls the pieces of the looped-model
contract (`loopus.looped`) and calls `backward()` once per supervised step. FSDP2 gathers a unit's
parameters in a pre-forward hook, so every piece must be the forward of a unit or a method registered
as one:

- each decoder layer, the gate and the confidence head are units of their own;
- the root unit holds the rest (embeddings, final norm, head; a tied head has to share the
  embedding's unit) and registers the contract's `ROOT_PIECES` as forward methods.

A dense (unlooped) model is run through its root `forward` (`looped.OneLoop`), so its layers and root
unit suffice. Several backwards per optimiser step are fine: each one reduce-scatters into
the sharded gradients, which accumulate until the step. Checkpoints and the final model are written
from full (gathered) state dicts, so they are the same files a single-process run writes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from ..looped import LoopedModel
from .params import base_layers

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: nn.Module, bf16: bool = False) -> nn.Module:
    """Apply FSDP2 in place (units as in the module docstring) and return the model.

    bf16: parameters are gathered in bf16 for compute, gradients reduced in fp32 (fp32 master weights).
    """
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in base_layers(model):
        fully_shard(layer, mp_policy=policy)
    looped = isinstance(model, LoopedModel)
    if looped:
        fully_shard(model.gate, mp_policy=policy)
        fully_shard(model.confidence_head, mp_policy=policy)
        register_fsdp_forward_method(model.confidence_head, "logits")
    fully_shard(model, mp_policy=policy)
    if looped:
        for name in LoopedModel.ROOT_PIECES:
            register_fsdp_forward_method(model, name)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered in full; a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def all_finite(params: list[nn.Parameter]) -> bool:
    """Whether this process's values (its shards under FSDP) of `params` are all finite."""
    return all(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all() for p in params)


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (inf: measure only); returns the total norm over all shards, as a plain tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = full_tensor(torch.nn.utils.get_total_norm(grads, foreach=False))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
    return total


def gather_full(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on CPU (a collective: every process calls it)."""
    return get_model_state_dict(module, options=FULL)


def gather_trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full values of the parameters that train, on CPU (a collective)."""
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    return {name: t for name, t in gather_full(module).items() if name in names}


def gather_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full optimiser state keyed by parameter name, on CPU (a collective)."""
    return get_optimizer_state_dict(module, optimizer, options=FULL)


def load_sharded(module: nn.Module, optimizer: torch.optim.Optimizer, trainable: dict[str, torch.Tensor],
                 optimizer_state: dict) -> None:
    """Scatter full trainable weights and optimiser state (as `gather_*` wrote them) into the shards."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(module, trainable, options=options)
    set_optimizer_state_dict(module, optimizer, optimizer_state, options=options)
