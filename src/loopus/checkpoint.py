"""Checkpoint integrity: refuse missing, partial or corrupt model directories with a clear message.

A safetensors file starts with an 8-byte header length and a JSON header that gives every tensor's
byte range, so a truncated file (a kill while copying or saving) is detected by comparing the
file size with the end of the last range, without reading the weights.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable

from .errors import LoopUSError


class CheckpointError(LoopUSError, RuntimeError):
    """A checkpoint directory that cannot be loaded as it is."""


def is_loopus_checkpoint(path: str | os.PathLike) -> bool:
    """Is `path` a directory whose config says `model_type: loopus` (False for anything else, unreadable included)?"""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "loopus"
    except ValueError:
        return False


def _check_safetensors_file(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes): re-save or re-copy the checkpoint")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise CheckpointError(f"{path} is truncated: its header alone needs {8 + header_len} bytes, file has {size}")
        try:
            header = json.loads(handle.read(header_len))
        except ValueError as err:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({err})") from err
    data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end != size:
        raise CheckpointError(
            f"{path} is partial: tensors need {8 + header_len + data_end} bytes, file has {size}. "
            "It was probably cut off while saving or copying; restore it from the source"
        )


def check_model_dir(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless `path` is a complete safetensors model directory."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{root} is a file; pass the checkpoint directory that holds config.json")
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{root} has no config.json: not a saved model, or saving did not finish")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (root / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise CheckpointError(
            f"{root} has config.json but no model.safetensors: the weights are missing (partial checkpoint)"
        )
    missing = [s for s in shards if not (root / s).is_file()]
    if missing:
        raise CheckpointError(f"{root} is missing weight shards {missing} listed in its index")
    for shard in shards:
        _check_safetensors_file(root / shard)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_path(name: str | os.PathLike) -> bool:
    """Whether `name` is meant as a local path rather than a hub id (`repo` or `namespace/repo`).

    Absolute, `./`, `../` and `~` names are paths; so is any name with a path separator, except the
    `namespace/repo` shape of a hub id (one separator, no leading dot).
    """
    if isinstance(name, os.PathLike):
        return True
    text = str(name)
    seps = [s for s in (os.sep, os.altsep) if s]
    prefixes = ("~", *seps, *(d + s for d in (".", "..") for s in seps))
    if text in (".", "..") or text.startswith(prefixes):
        return True
    return any(s in text for s in seps) and not _HUB_ID.fullmatch(text)


def check_finite(model: Any, source: str | os.PathLike) -> None:
    """Refuse a loaded model whose weights hold NaN or inf, naming the first such tensor.

    Corrupt bytes inside an intact file load silently and then give empty generations, chance-level
    scores or a "non-finite loss" in training. One min/max pass per tensor finds them (NaN propagates
    through both) without the memory of an elementwise mask.
    """
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or tensor.is_meta or not tensor.numel():
            continue
        if not all(v.isfinite() for v in tensor.aminmax()):
            raise CheckpointError(f"{source} holds non-finite values (NaN or inf) in {name}: the weights file is "
                                  "corrupt; restore it from the source, or re-save the model")


def check_model_path(name_or_path: str | os.PathLike, what: str = "model") -> None:
    """Refuse a model given as a local path that does not exist, or as a directory without config.json.

    Otherwise such a name reads as a hub id or a plain base model, and the error that follows says so.
    Names that are not local paths (hub ids, embedded names) pass.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name} has no config.json: not a saved model, or its config.json was deleted")
    elif path.exists():
        raise FileNotFoundError(f"{name} is a file: pass the model directory that holds config.json")
    elif looks_like_path(name_or_path):
        raise FileNotFoundError(f"{what} path {name} does not exist")


def load_checked(loader: Callable[..., Any], name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """Call a `from_pretrained` after checking a local directory, and refuse weights that did not load or
    are not finite."""
    name = os.path.expanduser(str(name_or_path))
    if looks_like_path(name) or os.path.exists(name):
        check_model_dir(name)
    wants_info = kwargs.pop("output_loading_info", False)
    model, info = loader(name, *args, output_loading_info=True, **kwargs)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise CheckpointError(
            f"{name} lacks {len(missing)} weights (e.g. {missing[:3]}): the checkpoint is partial or from "
            "another architecture; it would otherwise be silently filled with random values"
        )
    check_finite(model, name)
    return (model, info) if wants_info else model
