"""AdamW with decay only on matrices, and a warm-up + decay schedule counted in optimiser steps.

The schedule is not transformers' `get_scheduler`: its warm-ups start at lr 0 (`step / warmup`), which
spends the first optimiser step at lr 0 (with `warmup_steps=1`, the whole warm-up); this one starts at
`peak / warmup` (`(step + 1) / warmup`). After the warm-up the lrs are the same (cosine is transformers'
`cosine_with_min_lr` with `min_lr_rate=min_ratio`, linear its `polynomial` to `min_ratio * lr`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..adapters import ADAPTER_NAME
from .options import Section, option, parse_floats
from .recipes import DEFAULT

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimConfig(Section):
    """AdamW and its schedule, all counted in optimiser steps."""

    lr: float = option(DEFAULT["lr"], "peak learning rate")
    new_module_lr_mult: float = option(DEFAULT["new_module_lr_mult"], "lr multiplier for the new gate, input injection and "
                                       "confidence head")
    adapter_lr_mult: float = option(DEFAULT["adapter_lr_mult"], "lr multiplier for the depth-wise adapters")
    min_lr_ratio: float = option(DEFAULT["min_lr_ratio"], "final lr / peak lr")
    weight_decay: float = option(DEFAULT["weight_decay"], "AdamW weight decay (matrices only)")
    betas: tuple[float, float] = option(DEFAULT["betas"], "AdamW betas, e.g. 0.9,0.95", parse=parse_floats)
    warmup_steps: int | None = option(None, "linear warm-up, in optimiser steps (default: --warmup-ratio of the "
                                      "run)", parse=int)
    warmup_ratio: float = option(DEFAULT["warmup_ratio"], "warm-up as a share of the run's optimiser steps, when "
                                 "--warmup-steps is not given")
    schedule: str = option(DEFAULT["schedule"], "lr after the warm-up", choices=SCHEDULES)
    max_grad_norm: float = option(DEFAULT["max_grad_norm"], "gradient clipping norm (0: off)")

    def check(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if not 0 <= self.warmup_ratio < 1 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ValueError(f"need warmup_steps >= 0 and 0 <= warmup_ratio < 1, got {self.warmup_steps}, "
                             f"{self.warmup_ratio}")

    def warmup(self, total_steps: int) -> int:
        """Warm-up length in optimiser steps."""
        return self.warmup_steps if self.warmup_steps is not None else round(self.warmup_ratio * total_steps)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(model, self.lr, self.weight_decay, self.betas, self.new_module_lr_mult,
                               self.adapter_lr_mult)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int,
                  step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
        return build_scheduler(optimizer, total_steps, self.warmup(total_steps), self.schedule, self.min_lr_ratio,
                               step)


def is_new_module(name: str) -> bool:
    """Parameters LoopUS adds to the base model (selective gate, input injection, confidence head)."""
    parts = name.split(".")
    return "confidence_head" in parts or "gate" in parts or "injection" in parts


def is_depth_adapter(name: str) -> bool:
    """Weights of the depth-wise LoRA adapters (`loopus.adapters`, adapter name `depth`)."""
    parts = name.split(".")
    return ("lora_A" in parts or "lora_B" in parts) and ADAPTER_NAME in parts


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas,
                    new_module_lr_mult: float = 1.0, adapter_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """AdamW; `new_module_lr_mult` scales the lr of the freshly initialised gate and confidence head,
    `adapter_lr_mult` that of the depth-wise adapters."""
    mults = (1.0, new_module_lr_mult, adapter_lr_mult)  # by kind: base weights, new modules, adapters
    buckets: dict[tuple[bool, int], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = 1 if is_new_module(name) else 2 if is_depth_adapter(name) else 0
            buckets.setdefault((p.ndim >= 2, kind), []).append(p)
    groups = []
    for (decays, kind), params in sorted(buckets.items()):
        groups.append({"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": lr * mults[kind]})
    # foreach left to torch: the multi-tensor update on a GPU (one launch for many tensors, where a
    # per-tensor loop is launch-bound for a small model), the per-tensor loop on a CPU
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr before optimiser step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int, schedule: str, min_ratio: float,
                    step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule over each param group's `initial_lr`, set for optimiser step `step` (0-based).

    The lr is a pure function of the peak and the step, so a resumed run builds its schedule at the
    restored step (`step > 0` needs `initial_lr` in every group) instead of loading a saved one.
    """
    factor = functools.partial(lr_factor, total=total, warmup=warmup, schedule=schedule, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=step - 1)
