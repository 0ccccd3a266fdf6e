"""Shared helpers for the training tests: tiny LoopUS models and corpora (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import loopus
from conftest import tiny_base

WORDS = ("the cat sat on the mat. a dog ran to the park. the sun is warm today. we like to read books. "
         "rivers flow into the sea. birds sing in the morning. ").split(". ")


def write_corpus(root: Path, name: str = "tiny", docs: int = 200, seed: int = 0) -> Path:
    """A small, learnable corpus: NAME/train.jsonl and NAME/valid.jsonl under `root`."""
    import random

    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", docs), ("valid", max(4, docs // 10))):
        with (folder / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                text = ". ".join(rng.choice(WORDS).strip() for _ in range(rng.randint(2, 6))) + "."
                f.write(json.dumps({"text": text}) + "\n")
    return folder


def tiny_loopus(family: str = "llama", seed: int = 0, encoder: int = 1, decoder: int = 1):
    return loopus.convert(tiny_base(family, seed).train(), encoder, decoder, gate_rank=8)


def kill_inside_step(trainer, step: int, layer: int) -> None:
    """Train `trainer` and kill it inside optimiser step `step` + 1, after the checkpoint of `step` (a
    KeyboardInterrupt raised from layer `layer`'s forward, as a real kill would land mid-step)."""
    import pytest

    def kill(module, args):
        if trainer.step == step and trainer.optimizer.state:
            raise KeyboardInterrupt("simulated kill")

    trainer.core.layers[layer].register_forward_pre_hook(kill)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
