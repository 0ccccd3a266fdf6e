"""Named training recipes: each a complete set of the options that decide what trains and how.

A recipe leaves out what is not a choice of method: the model, the data and its size, the length of
the run and the bookkeeping. `TrainConfig`'s defaults are `DEFAULT`; `loopus train --recipe NAME` starts
from another, and flags then override single options. Measurements behind each: docs/RESULTS.md.

- `DEFAULT`      function-preserving LoopUS: gate almost closed at init, T ~ U{2..4} with loop 1
                 always supervised, the layers from the encoder's end on train, and depth-wise adapters
                 on the reasoning block from loop 2 on. On rows spread over many documents it matched
                 the dense baseline at one loop (the recipe study's winner).
- `FROZEN_BASE`  `DEFAULT` with every base weight frozen: only the depth adapters, gate and confidence
                 head train, so one loop stays exactly the base model.
- `PAPER`        the original method's recipe: gate at 0.5, T ~ U{2..8}, |S| = 2, new modules at the base lr.
- `ITERATE`      built for iteration (reasoning SFT): the encoder output re-injected into every loop, T drawn
                 wide (Poisson-lognormal, mean ramped from 1 to 6 over the middle half of the run, up to 16),
                 loops 1 and T supervised with backpropagation through the last 4 loops only, a gate that
                 starts at 0.005 (function preserving to 16 loops) and cannot close below half that, and
                 the new modules at 100x the base lr. The confidence head
                 trains on detached states in every recipe, so its loss cannot pull the loop shut.
                 Pair it with a small looped block (e.g. `--encoder-layers 7 --decoder-layers 8` on Gemma 3
                 270M: three plateau layers, see `loopus analyze`).
- `DENSE`        the unlooped base on the same tokens, with the optimiser settings of `DEFAULT`.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from ..config import LoopUSConfig

MODEL_DEFAULTS = LoopUSConfig()  # the conversion options take the model config's defaults, stated there once

FULL_WEIGHT_FREEZE = ("embeddings", "encoder")
FROZEN_BASE_FREEZE = ("embeddings", "encoder", "reasoning", "decoder", "head")

DEFAULT: Mapping[str, Any] = MappingProxyType({
    # what trains
    "mode": "loopus",
    "freeze": FULL_WEIGHT_FREEZE,
    "lora_rank": 0,
    "depth_lora_rank": 16,           # where the run can use them (not dense, --lora-rank, FSDP, checkpointing)
    "depth_lora_alpha": MODEL_DEFAULTS.depth_lora_alpha,
    "depth_lora_count": MODEL_DEFAULTS.depth_lora_count,
    "gate_rank": MODEL_DEFAULTS.gate_rank,
    "gate_init": MODEL_DEFAULTS.gate_init,
    "gate_floor": MODEL_DEFAULTS.gate_floor,
    "input_injection": MODEL_DEFAULTS.input_injection,
    # optimiser and schedule
    "lr": 7e-6,
    "new_module_lr_mult": 1000.0,    # a near-closed gate barely moves at the base weights' lr
    "adapter_lr_mult": 10.0,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.0,
    "betas": (0.9, 0.95),
    "warmup_ratio": 0.1,
    "schedule": "cosine",
    "max_grad_norm": 1.0,
    # random deep supervision
    "horizon_min": 2,
    "horizon_max": 4,
    "horizon_dist": "uniform",
    "horizon_mean": 3.0,             # used by the poisson_lognormal draw only
    "horizon_ramp": (0.25, 0.75),
    "supervised_min": 2,
    "supervised_max": 2,
    "grad_steps": 1,
    "supervise_last": True,
    "supervise_first": True,
    "beta_mono": 0.1,
    "lambda_conf": 0.1,
    "conf_margin": 0.05,
    "kl_base": 0.0,
    # how rows are cut from documents
    "packing": "documents",
})

FROZEN_BASE: Mapping[str, Any] = MappingProxyType({**DEFAULT, "freeze": FROZEN_BASE_FREEZE})

PAPER: Mapping[str, Any] = MappingProxyType({
    **DEFAULT, "depth_lora_rank": 0, "gate_init": 0.5, "horizon_max": 8, "supervise_first": False,
    "new_module_lr_mult": 1.0, "lr": 2e-5,
})

ITERATE: Mapping[str, Any] = MappingProxyType({
    **DEFAULT, "input_injection": True, "gate_init": 0.005, "gate_floor": 0.0025,
    "horizon_dist": "poisson_lognormal",
    "horizon_min": 1, "horizon_mean": 6.0, "horizon_max": 16, "grad_steps": 4, "new_module_lr_mult": 100.0,
})

DENSE: Mapping[str, Any] = MappingProxyType({**DEFAULT, "mode": "dense", "depth_lora_rank": 0})

RECIPES: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {"default": DEFAULT, "frozen_base": FROZEN_BASE, "paper": PAPER, "iterate": ITERATE, "dense": DENSE})


def recipe(name: str) -> dict[str, Any]:
    """The options of recipe `name` (a copy)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return dict(RECIPES[name])
