"""The model a run post-trains: built from an embedded name, a base checkpoint or a LoopUS checkpoint.

`BuildConfig` holds what decides the model and what of it trains (mode, split, conversion options,
frozen parts, adapters); `build_model` loads and converts it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..checkpoint import is_loopus_checkpoint
from ..convert import check_split, convert
from ..looped import LoopedModel
from ..zoo import check_base_exists, load_base
from .options import Section, option, parse_strings
from .recipes import DEFAULT

MODES = ("loopus", "dense")
FREEZABLE = ("embeddings", "encoder", "reasoning", "adapters", "gate", "injection", "decoder", "head", "confidence")


@dataclass(frozen=True)
class BuildConfig(Section):
    """What model is trained and which of its parts train."""

    model: str = option("gemma-3-270m", "embedded name (gemma-3-270m), base checkpoint dir, hub id, or a LoopUS "
                        "checkpoint dir")
    mode: str = option(DEFAULT["mode"], "loopus: random deep supervision; dense: the unlooped base on the same "
                       "tokens", choices=MODES)
    encoder_layers: int | None = option(None, "split for a plain base model: layers run once before the loop",
                                        parse=int)
    decoder_layers: int | None = option(None, "split for a plain base model: layers run once after the loop",
                                        parse=int)
    gate_rank: int = option(DEFAULT["gate_rank"], "gate bottleneck when converting")
    gate_init: float = option(DEFAULT["gate_init"], "gate mixing share at init when converting")
    gate_floor: float = option(DEFAULT["gate_floor"], "smallest gate share when converting (0: the gate can close "
                               "fully); below --gate-init")
    input_injection: bool = option(DEFAULT["input_injection"], "when converting: feed the encoder output into every "
                                   "loop from loop 2 on (zero-initialised)")
    freeze: tuple[str, ...] = option(DEFAULT["freeze"], f"comma list of frozen parts ({', '.join(FREEZABLE)}) or "
                                     "none; the frozen_base recipe freezes embeddings,encoder,reasoning,decoder,head",
                                     parse=parse_strings)
    lora_rank: int = option(DEFAULT["lora_rank"], "> 0: train LoRA adapters (PEFT) of this rank instead of full "
                            "weights")
    lora_alpha: float = option(16.0, "LoRA alpha")
    lora_dropout: float = option(0.0, "LoRA dropout")
    depth_lora_rank: int | None = option(None, "> 0: depth-wise LoRA adapters (PEFT) on the reasoning block, "
                                         f"active from loop 2 on; 0: none (default: {DEFAULT['depth_lora_rank']} "
                                         "where the run can use them, else 0)", parse=int)
    depth_lora_alpha: float = option(DEFAULT["depth_lora_alpha"], "LoRA alpha of the depth-wise adapters")
    depth_lora_count: int = option(DEFAULT["depth_lora_count"], "distinct depth-wise adapters: 1 shares one "
                                   "across loops 2 on; k > 1 gives loops 2..k+1 one each")

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        unknown = sorted(set(self.freeze) - set(FREEZABLE) - {"none"})
        if unknown:
            raise ValueError(f"--freeze got unknown parts {unknown}; choose from {', '.join(FREEZABLE)} or none")
        if self.depth_lora_rank is not None and self.depth_lora_rank < 0:
            raise ValueError(f"depth_lora_rank must be >= 0, got {self.depth_lora_rank}")
        if self.depth_lora_count < 1:
            raise ValueError(f"depth_lora_count must be >= 1, got {self.depth_lora_count}")

    @property
    def looped(self) -> bool:
        return self.mode == "loopus"

    @property
    def frozen(self) -> set[str]:
        return set(self.freeze) - {"none"}

    @property
    def split(self) -> tuple[int, int]:
        """(encoder, decoder) layers the parameter groups use; 0 where no split is known."""
        return self.encoder_layers or 0, self.decoder_layers or 0


def build_model(
    cfg: BuildConfig, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, BuildConfig]:
    """The model to post-train (fp32, train mode), its tokenizer, and `cfg` with the split it was built with.

    A looped run gets a LoopUS model: a LoopUS checkpoint as it is, or a base model converted with the
    split and gate options (depth-wise adapters of `depth_lora_rank` are added to a checkpoint without
    them). A dense run gets the plain base model: a LoopUS checkpoint's own, whose split is then
    returned so that the dense baseline freezes the same layers. `model` (and `tokenizer`) replace
    loading `cfg.model`. `cfg.depth_lora_rank` must be resolved (`config.resolve`).
    """
    encoder_layers, decoder_layers = cfg.encoder_layers, cfg.decoder_layers
    split_given = encoder_layers is not None and decoder_layers is not None
    if model is None:
        check_base_exists(cfg.model)
    given_looped = isinstance(model, LoopedModel) if model is not None else is_loopus_checkpoint(cfg.model)
    if cfg.looped and not given_looped and not split_given:
        raise ValueError(f"{cfg.model} is a plain base model: give the split with --encoder-layers N "
                         "--decoder-layers N (or pass a converted LoopUS checkpoint)")
    if model is None and given_looped:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.model)
    elif model is None:
        model, loaded_tokenizer = load_base(cfg.model)
        tokenizer = tokenizer or loaded_tokenizer
    if given_looped and cfg.looped and split_given:
        own = (model.config.encoder_layers, model.config.decoder_layers)
        if own != (encoder_layers, decoder_layers):
            raise ValueError(f"{cfg.model} is a LoopUS checkpoint with its own split (encoder {own[0]}, decoder "
                             f"{own[1]}): leave out --encoder-layers/--decoder-layers")
    rank, count = cfg.depth_lora_rank, cfg.depth_lora_count
    if not cfg.looped:
        if given_looped:
            if not split_given:
                encoder_layers, decoder_layers = model.config.encoder_layers, model.config.decoder_layers
            model = model.base
        elif split_given:
            check_split(model.config.num_hidden_layers, encoder_layers, decoder_layers)
    elif not given_looped:
        model = convert(model, encoder_layers, decoder_layers, gate_rank=cfg.gate_rank, gate_init=cfg.gate_init,
                        gate_floor=cfg.gate_floor, input_injection=cfg.input_injection,
                        depth_lora_rank=rank, depth_lora_alpha=cfg.depth_lora_alpha, depth_lora_count=count)
    elif rank > 0 and model.config.depth_lora_rank == 0:
        model.add_depth_adapters(rank, cfg.depth_lora_alpha, count)
    if cfg.looped and rank > 0 and model.config.depth_lora_rank != rank:
        raise ValueError(f"{cfg.model} has depth adapters of rank {model.config.depth_lora_rank}, not "
                         f"--depth-lora-rank {rank}")
    if cfg.looped and rank > 0 and model.config.depth_lora_count != count:
        raise ValueError(f"{cfg.model} has {model.config.depth_lora_count} depth adapter(s), not "
                         f"--depth-lora-count {count}")
    built = dataclasses.replace(cfg, encoder_layers=encoder_layers, decoder_layers=decoder_layers)
    return model.float().train(), tokenizer, built
