"""Depth-wise LoRA: PEFT adapters on the reasoning block that act from the second loop on.

A looped block applies the same weights at every depth. Depth-wise adapters (Relaxed Recursive
Transformers, Think-at-Hard) give the later passes their own low-rank update while the first pass
keeps the pretrained weights, so one loop computes the base model exactly, before and after
training, and only the extra loops are learned. The adapters are injected with PEFT's
`inject_adapter_in_model` under the adapter name `depth`, so they are ordinary submodules of the
LoopUS model: `save_pretrained` writes them with the rest of the weights and `from_pretrained`
rebuilds them from the config (`depth_lora_rank`, `depth_lora_alpha`), with no PEFT wrapper.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

from torch import nn

ADAPTER_NAME = "depth"


def inject_depth_adapters(model: nn.Module, layers: list[nn.Module], prefixes: list[str], rank: int,
                          alpha: float) -> None:
    """LoRA (adapter `depth`) on every linear layer inside `layers` (named `prefixes` in `model`).

    PEFT marks everything but adapters as frozen when it injects; the caller's requires_grad choices
    are restored, so injecting changes no other parameter.
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = [f"{prefix}.{name}" for prefix, layer in zip(prefixes, layers)
             for name, module in layer.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError("the reasoning block has no linear layers to give depth-wise adapters")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules="^(" + "|".join(re.escape(n) for n in names) + ")$")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for p in model.parameters():
        p.requires_grad_(flags.get(id(p), True))  # new adapter weights train unless frozen later


def depth_adapter_layers(layers: list[nn.Module]) -> list[nn.Module]:
    """The PEFT tuner layers inside `layers` that hold a depth adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for layer in layers for m in layer.modules()
            if isinstance(m, BaseTunerLayer) and ADAPTER_NAME in m.active_adapters]


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
    flags = [(p, p.requires_grad) for m in tuner_layers for p in m.parameters()]
    for m in tuner_layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in tuner_layers:
            m.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)
