"""Atomic, resumable training checkpoints.

`DIR/checkpoints/step-00000042/` holds
    trainable.safetensors   every parameter that trains (names as in the training module)
    optimizer.pt
    random_states_{r}.pkl   python / numpy / torch (and CUDA) RNG states of each process
    trainer_state.json      step, data position, tokens seen, the run's config
It is written into a temporary directory and renamed into place with `os.replace`, so a kill at
any moment leaves either the previous checkpoint set or the new one, never a half-written one.
Weights are checked finite before anything is written: a poisoned state never becomes a checkpoint.

The RNG states are Accelerate's: every process calls `Accelerator.save_state(staging dir)` and
`Accelerator.load_state(checkpoint)`. Nothing else goes through them: RDS runs the model's pieces
outside DDP, so model and optimiser are not `prepare`d objects, and only the trainable weights are
kept. The lr schedule is rebuilt from the step on resume (`optim.build_scheduler`), so it is not
saved; the `scheduler.pt` of older checkpoints is not read.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError, _check_safetensors_file

STATE_FILE = "trainer_state.json"


def checkpoint_root(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints"


def staging_dir(out: str | os.PathLike, step: int) -> Path:
    return checkpoint_root(out) / f".tmp-step-{step:08d}"


def prepare_staging(out: str | os.PathLike, step: int) -> Path:
    tmp = staging_dir(out, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finalize_checkpoint(
    out: str | os.PathLike,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write the main process's files into the staging dir and move it into place atomically.

    `optimizer_state` is `optimizer.state_dict()`, or under FSDP the gathered full state keyed by name.
    """
    tmp = staging_dir(out, step)
    bad = [name for name, t in trainable.items() if not torch.isfinite(t).all()]
    if bad:
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(out)
        raise CheckpointError(f"refusing to write checkpoint step {step}: non-finite weights {bad[:3]} "
                              f"({len(bad)} in all); the last good checkpoint is {last or 'none'}")
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in trainable.items()}, tmp / "trainable.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
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


def set_aside_diverged(out: str | os.PathLike, step: int) -> Path | None:
    """After the update following `step` diverged: move a checkpoint of `step` out of the resumable set.

    It holds the very weights whose loss was non-finite, and a resume replays the same batch and plan
    on them, so it would diverge again at any lr. It is renamed `diverged-step-N`, not deleted.
    Returns the latest checkpoint left, the one to name as last good.
    """
    last = latest_checkpoint(out)
    if last is not None and last.name == f"step-{step:08d}":
        aside = last.with_name(f"diverged-{last.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(last, aside)
    return latest_checkpoint(out)


def _read(checkpoint: Path, name: str, reader: Callable[[Path], Any]) -> Any:
    """`reader` on file `name` of `checkpoint`; a file that does not parse (truncated, corrupt) is named,
    with the older checkpoint to resume from instead."""
    try:
        return reader(checkpoint / name)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, SafetensorError) as err:
        older = [p for p in list_checkpoints(checkpoint.parent.parent) if p != checkpoint]
        way_out = f"delete {checkpoint} to resume from {older[-1]}" if older else "no older checkpoint is left"
        detail = str(err).split(". ")[0]
        raise CheckpointError(f"{checkpoint / name} is corrupt or truncated ({type(err).__name__}: {detail}); "
                              f"{way_out}") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint (CPU tensors); raises CheckpointError if it is incomplete or corrupt."""
    path = Path(path)
    needed = ["trainable.safetensors", "optimizer.pt", STATE_FILE]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    _check_safetensors_file(path / "trainable.safetensors")
    return {
        "trainable": _read(path, "trainable.safetensors", load_file),
        "optimizer": _read(path, "optimizer.pt", lambda f: torch.load(f, weights_only=True)),
        "state": _read(path, STATE_FILE, lambda f: json.loads(f.read_text())),
    }


def load_rng(accelerator: Accelerator, path: str | os.PathLike) -> None:
    """Restore this process's RNG states from checkpoint `path`.

    Checkpoints written before the states were Accelerate's hold them as `rng-rank{r}.pt`.
    """
    legacy = Path(path) / f"rng-rank{accelerator.process_index}.pt"
    if not legacy.is_file():
        accelerator.load_state(str(path))
        return
    state = torch.load(legacy, weights_only=True)
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
