"""What trains: named parameter groups, freezing, LoRA adapters (PEFT) and gradient checkpointing.

Groups of a LoopUS model: `embeddings` (token embeddings), `encoder` (layers [0, e)), `reasoning`
(layers [e, d)), `adapters` (the depth-wise LoRA adapters of the reasoning block, if any), `gate`,
`injection` (the input injection, if any), `decoder` (layers [d, L) and the final norm), `head` (lm_head),
`confidence` (the confidence head). A dense (unlooped) model has the same groups without gate,
injection and confidence; its
`encoder` is its first e layers when a split is given, so both modes can train the same weights.
A tied lm_head is the embedding matrix: it trains only if neither `embeddings` nor `head` is frozen.
"""

from __future__ import annotations

import hashlib
import re

import torch
from torch import nn

from ..compat import checkpointing_method
from ..looped import LoopedModel


def base_layers(model: nn.Module) -> nn.ModuleList:
    """The base model's decoder layers, of a LoopUS model or of a plain causal LM."""
    return model.layers if hasattr(model, "layers") else model.model.layers


def _inner(model: nn.Module) -> nn.Module:
    """The base causal LM (LoopUS models wrap it as `.base`)."""
    return model.base if isinstance(model, LoopedModel) else model


def parameter_groups(model: nn.Module, encoder_layers: int = 0, decoder_layers: int = 0) -> dict[str, str]:
    """Map every parameter name of `model` to its group; raises if a parameter belongs to none."""
    looped = isinstance(model, LoopedModel)
    if looped:
        encoder_layers, decoder_layers = model.config.encoder_layers, model.config.decoder_layers
    base = _inner(model)
    num_layers = len(base_layers(base))
    owner: dict[int, str] = {}

    def mark(module: nn.Module | None, group: str) -> None:
        if module is None:
            return
        for p in module.parameters():
            owner.setdefault(id(p), group)

    # the embedding first: a tied lm_head then resolves to "embeddings"
    mark(base.get_input_embeddings(), "embeddings")
    if looped:
        for p in model.depth_adapter_parameters():  # before the layers that hold them
            owner.setdefault(id(p), "adapters")
    for i, layer in enumerate(base_layers(base)):
        if i < encoder_layers:
            group = "encoder"
        elif i >= num_layers - decoder_layers:
            group = "decoder"
        else:
            group = "reasoning"
        mark(layer, group)
    mark(base.model.norm, "decoder")
    mark(base.get_output_embeddings(), "head")
    if looped:
        mark(model.gate, "gate")
        mark(model.injection, "injection")
        mark(model.confidence_head, "confidence")
    groups = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in owner:
            raise RuntimeError(f"parameter {name} belongs to no trainable group; add it to loopus.train.params")
        groups[name] = owner[id(p)]
    return groups


def tied_head(model: nn.Module) -> bool:
    base = _inner(model)
    out = base.get_output_embeddings()
    return out is not None and out.weight is base.get_input_embeddings().weight


def apply_freeze(model: nn.Module, frozen: set[str], encoder_layers: int = 0, decoder_layers: int = 0) -> dict[str, bool]:
    """Set requires_grad per group; returns {parameter name: trains}."""
    groups = parameter_groups(model, encoder_layers, decoder_layers)
    tied = tied_head(model)
    trains = {}
    for name, p in model.named_parameters():
        group = groups[name]
        train = group not in frozen
        if tied and group == "embeddings":
            train = "embeddings" not in frozen and "head" not in frozen
        p.requires_grad_(train)
        trains[name] = train
    if not any(trains.values()):
        raise ValueError(f"--freeze {','.join(sorted(frozen))} leaves nothing to train")
    return trains


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")


def apply_lora(model: nn.Module, frozen: set[str], rank: int, alpha: float, dropout: float,
               encoder_layers: int = 0, decoder_layers: int = 0):
    """Wrap `model` with PEFT LoRA on the linear layers of the trainable transformer groups.

    Gate, injection and confidence head (small, new) keep training in full unless frozen. Returns the PEFT model;
    the original module tree (with LoRA layers injected) is `peft_model.base_model.model`.
    """
    from peft import LoraConfig, get_peft_model

    groups = parameter_groups(model, encoder_layers, decoder_layers)
    targets = sorted({
        name.rsplit(".", 1)[0]
        for name, group in groups.items()
        if group in ("encoder", "reasoning", "decoder") and group not in frozen
        and name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEAR_NAMES
    })
    if not targets:
        raise ValueError("LoRA found no linear layers to adapt in the trainable groups")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules="^(" + "|".join(re.escape(t) for t in targets) + ")$")
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.base_model.model.named_parameters():
        group = groups.get(name)
        if group in ("gate", "injection", "confidence") and group not in frozen:
            p.requires_grad_(True)
    return peft_model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing of every decoder layer (recomputed in the backward).

    Non-reentrant so that layers fed a detached state (every RDS gradient window starts from one)
    still give gradients to their parameters.
    """
    target = _inner(model) if not hasattr(model, "gradient_checkpointing_enable") else model
    checkpointing_method(target, "enable")({"use_reentrant": False})  # the checkpoint kwargs: first in both releases
    layers = base_layers(_inner(model))
    if not all(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        raise RuntimeError(f"gradient checkpointing did not reach the decoder layers of {type(model).__name__}")


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Undo `enable_gradient_checkpointing` (before saving the trained model)."""
    checkpointing_method(model, "disable")()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def weights_digest(model: nn.Module) -> str:
    """A hash of every weight of `model` (names, shapes, dtypes and bytes): what a resumed run started from."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
