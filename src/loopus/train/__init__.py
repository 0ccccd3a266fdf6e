"""Post-training of LoopUS models with random deep supervision (RDS), and a dense baseline.

One concern per module:

- `config`        `TrainConfig` (the sub-configs below, composed) and `resolve(cfg, runtime)`
- `options`       option fields with their help text, from which the CLI flags are generated
- `recipes`       named recipes: DEFAULT, FROZEN_BASE, PAPER, DENSE
- `model`         `BuildConfig`; the model to train, from a base or LoopUS checkpoint
- `objective`     `RDSConfig`; the RDS objective (plan sampling, chunked CE, L_LM + beta L_mono + lambda L_Q)
- `data`          `DataConfig`; local .txt/.jsonl and HF datasets -> packed, shuffled, mixed token sequences
- `params`        what trains: freezing, LoRA (PEFT), gradient checkpointing
- `optim`         `OptimConfig`; AdamW parameter groups and the warm-up + decay schedule
- `checkpointing` atomic, resumable checkpoints (weights, optimiser, RNG, data position)
- `tracking`      `LogConfig`; run logs: train.jsonl, TensorBoard and any other Accelerate tracker
- `evaluation`    validation loss at several loop counts and confidence calibration
- `sharding`      FSDP2 units and full state dicts
- `flops`         model FLOPs of a step, for MFU
- `trainer`       the Accelerate training loop (single process, DDP, FSDP)
"""

import importlib

_EXPORTS = {
    "TrainConfig": "config",
    "Runtime": "config",
    "resolve": "config",
    "BuildConfig": "model",
    "DataConfig": "data",
    "RDSConfig": "objective",
    "OptimConfig": "optim",
    "LogConfig": "tracking",
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
