"""Post-training of LoopUS models with random deep supervision (RDS), and a dense baseline.

One concern per module:

- `config`        `TrainConfig`: every training choice, from flags or a YAML/JSON file
- `objective`     the RDS objective (horizon / supervision sampling, chunked CE, L_LM + beta L_mono + lambda L_Q)
- `data`          local .txt/.jsonl and HF datasets -> packed, shuffled, mixed token sequences
- `params`        what trains: freezing, LoRA (PEFT), gradient checkpointing
- `optim`         AdamW parameter groups and the warm-up + decay schedule (counted in optimiser steps)
- `checkpointing` atomic, resumable checkpoints (weights, optimiser, RNG, data position)
- `tracking`      run logs: train.jsonl, TensorBoard and any other Accelerate tracker
- `evaluation`    validation loss at several loop counts and confidence calibration
- `trainer`       the Accelerate training loop (single process, DDP)
"""

import importlib

_EXPORTS = {
    "TrainConfig": "config",
    "RDSPlan": "objective",
    "chunked_cross_entropy": "objective",
    "confidence_targets": "objective",
    "dense_step": "objective",
    "rds_step": "objective",
    "sample_plan": "objective",
    "build_data": "data",
    "evaluate": "evaluation",
    "Trainer": "trainer",
    "TrainingDiverged": "trainer",
    "train": "trainer",
}


def __getattr__(name: str):
    # lazy, so `loopus --help` and `loopus.train.config` do not import accelerate, peft, tensorboard
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
