"""Atomic, resumable training checkpoints.

`DIR/checkpoints/step-00000042/` holds
    trainable.safetensors   every parameter that trains (names as in the training module)
    optimizer.pt, scheduler.pt
    rng-rank{r}.pt          python / numpy / torch (and CUDA) RNG states of each process
    trainer_state.json      step, data position, tokens seen, the run's config
It is written into a temporary directory and renamed into place with `os.replace`, so a kill at
any moment leaves either the previous checkpoint set or the new one, never a half-written one.
Weights are checked finite before anything is written: a poisoned state never becomes a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError, _check_safetensors_file

STATE_FILE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_root(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints"


def staging_dir(out: str | os.PathLike, step: int) -> Path:
    return checkpoint_root(out) / f".tmp-step-{step:08d}"


def prepare_staging(out: str | os.PathLike, step: int) -> Path:
    tmp = staging_dir(out, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_rank_rng(tmp: Path, rank: int) -> None:
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")


def finalize_checkpoint(
    out: str | os.PathLike,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write the main process's files into the staging dir and move it into place atomically.

    `optimizer_state` is `optimizer.state_dict()`, or under FSDP the gathered full state keyed by name.
    """
    bad = [name for name, t in trainable.items() if not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"refusing to write a checkpoint with non-finite weights ({bad[:3]})")
    tmp = staging_dir(out, step)
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in trainable.items()}, tmp / "trainable.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        with f.open("rb") as handle:
            os.fsync(handle.fileno())
    final = checkpoint_root(out) / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike, rank: int = 0) -> dict[str, Any]:
    """Read a checkpoint (CPU tensors); raises CheckpointError if it is incomplete or corrupt."""
    path = Path(path)
    needed = ["trainable.safetensors", "optimizer.pt", "scheduler.pt", STATE_FILE]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    _check_safetensors_file(path / "trainable.safetensors")
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng-rank0.pt"
    return {
        "trainable": load_file(path / "trainable.safetensors"),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
        "rng": torch.load(rng_file, weights_only=True) if rng_file.is_file() else None,
        "state": json.loads((path / STATE_FILE).read_text()),
    }
