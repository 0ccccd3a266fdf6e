"""Depth-wise LoRA: PEFT adapters on the reasoning block that act from the second loop on.

A looped block applies the same weights at every depth. Depth-wise adapters (Relaxed Recursive
Transformers, Think-at-Hard) give the later passes their own low-rank update while the first pass
keeps the pretrained weights, so one loop computes the base model exactly, before and after
training, and only the extra loops are learned. The adapters are injected with PEFT's
`inject_adapter_in_model` under the adapter name `depth`, so they are ordinary submodules of the
LoopUS model: `save_pretrained` writes them with the rest of the weights and `from_pretrained`
rebuilds them from the config (`depth_lora_rank`, `depth_lora_alpha`, `depth_lora_count`), with no
PEFT wrapper.

With `depth_lora_count` = k > 1, loops 2..k+1 each get an adapter of their own (`depth`, `depth_3`,
..., PEFT's multi-adapter layers, one active at a time) and the loops after k+1 reuse the last: one
shared adapter applied again and again is a single correction that overshoots when repeated, while
per-loop adapters can learn a different step at each depth (Relaxed Recursive Transformers).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterator

from torch import nn

ADAPTER_NAME = "depth"


def adapter_name(loop: int, count: int) -> str:
    """The depth adapter that loop `loop` (1-based, >= 2) runs with, of `count` distinct ones."""
    loop = min(loop, count + 1)
    return ADAPTER_NAME if loop == 2 else f"{ADAPTER_NAME}_{loop}"


def inject_depth_adapters(model: nn.Module, layers: list[nn.Module], prefixes: list[str], rank: int,
                          alpha: float, count: int = 1) -> list[nn.Module]:
    """LoRA adapters `depth` (and `depth_3`, ... for `count` > 1) on every linear layer inside `layers`
    (named `prefixes` in `model`); returns the PEFT tuner layers, with `depth` active.

    PEFT marks everything but adapters as frozen when it injects; the caller's requires_grad choices
    are restored, so injecting changes no other parameter.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [f"{prefix}.{name}" for prefix, layer in zip(prefixes, layers)
             for name, module in layer.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError("the reasoning block has no linear layers to give depth-wise adapters")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules="^(" + "|".join(re.escape(n) for n in names) + ")$")
    with warnings.catch_warnings():  # PEFT warns that a second adapter makes a multi-adapter model: it is meant to
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        for loop in range(2, count + 2):
            inject_adapter_in_model(config, model, adapter_name=adapter_name(loop, count))
    tuners = [m for layer in layers for m in layer.modules()
              if isinstance(m, BaseTunerLayer) and ADAPTER_NAME in getattr(m, "lora_A", {})]
    for m in tuners:
        m.set_adapter(ADAPTER_NAME)
    for p in model.parameters():
        p.requires_grad_(flags.get(id(p), True))  # new adapter weights train unless frozen later
    return tuners


@contextlib.contextmanager
def _grad_flags_kept(tuner_layers: list[nn.Module]) -> Iterator[None]:
    """PEFT's adapter toggles also set requires_grad; put the caller's flags back afterwards."""
    flags = [(p, p.requires_grad) for m in tuner_layers for p in m.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def select_adapter(tuner_layers: list[nn.Module], name: str) -> None:
    """Make `name` the active depth adapter (PEFT's public `set_adapter`), keeping every requires_grad flag:
    an adapter used earlier in the same gradient window must still receive its gradient."""
    with _grad_flags_kept(tuner_layers):
        for m in tuner_layers:
            if m.active_adapters != [name]:
                m.set_adapter(name)


@contextlib.contextmanager
def adapters_disabled(tuner_layers: list[nn.Module]) -> Iterator[None]:
    """Run without the depth adapters (PEFT's public `enable_adapters`), then turn them back on.

    PEFT's toggle also sets the adapters' requires_grad; the previous flags are put back, so a frozen
    adapter stays frozen. The toggle is module state: it is not replayed by activation
    checkpointing, which is why depth adapters and gradient checkpointing are not combined.
    """
    if not tuner_layers:
        yield
        return
    with _grad_flags_kept(tuner_layers):
        for m in tuner_layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m in tuner_layers:
                m.enable_adapters(True)
