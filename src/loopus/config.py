"""`LoopUSConfig`: the base model's config plus every choice the looped recasting makes.

Its `__init__` states the default of every choice once; `convert` and the `loopus` commands read them
from here (`LoopUSConfig()` is a config with every default).
"""

from __future__ import annotations

import numbers
import os
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .cache import KV_MODES
from .checkpoint import CheckpointError
from .errors import LoopUSError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3")


class SplitError(LoopUSError, ValueError):
    """An encoder / reasoning / decoder split that cannot be built."""


def check_int(value: Any, name: str, minimum: int) -> int:
    """`value` as an int >= `minimum`; refuses bools, floats (no silent truncation of 2.7) and strings."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_num_loops(value: Any) -> int:
    """A loop budget: an integer >= 1."""
    return check_int(value, "num_loops", 1)


def register_peft_defaults() -> None:
    """PEFT's default LoRA targets for `model_type: loopus`: those of the supported base families.

    A LoopUS model holds its base model's own attention modules, so `LoraConfig(task_type="CAUSAL_LM")`
    without `target_modules` adapts the same projections it would adapt on the base model.
    """
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as lora_targets

    targets: list[str] = []
    for model_type in SUPPORTED_MODEL_TYPES:
        targets += [t for t in lora_targets.get(model_type, ()) if t not in targets]
    lora_targets.setdefault(LoopUSConfig.model_type, targets)


class LoopUSConfig(PretrainedConfig):
    """A pretrained decoder LM recast as encoder -> looped reasoning block -> decoder.

    Args:
        base_config: config of the wrapped causal LM (its own `model_type`); None only in a config that
            holds the defaults, from which no model is built.
        encoder_layers: number of leading base layers run once before the loop.
        decoder_layers: number of trailing base layers run once after the loop.
        num_loops: loop count used when `forward` is not given one.
        gate_rank: bottleneck width of the selective gate.
        gate_init: the gate's mixing coefficient at initialisation (share of the new state taken). The
            default 0.02 keeps every extra loop close to a no-op at initialisation, so that training has to
            earn it (docs/RESULTS.md).
        gate_floor: the smallest share the gate can take (0: it can close fully). A floor keeps every loop
            from switching itself off during training; it must lie below `gate_init`.
        input_injection: feed the encoder output h_0 into every pass from loop 2 on, through a linear map
            that starts at zero (so every loop count starts as without it), as Huginn and McLeish et al.
            do: a deep loop keeps a direct view of the problem instead of only its own last state.
        kv_mode: "per_depth" keeps one KV per reasoning layer and loop depth; "shared" keeps one per layer.
        depth_lora_rank: rank of the depth-wise LoRA adapters (PEFT) on the reasoning block's linear
            layers, active from loop 2 on (0: none). Loop 1 runs without them, so one loop stays
            the base model; their B matrices start at zero, so every loop count does too.
        depth_lora_alpha: LoRA scaling numerator of those adapters (the update is scaled by alpha / rank).
        depth_lora_count: how many distinct depth-wise adapters: 1 (one shared by every loop from 2 on),
            or k > 1 (loops 2..k+1 one each, later loops reuse the last).
        use_cache: whether inference forwards build a KV cache by default.
    """

    model_type = "loopus"
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", optional=True)}

    def __init__(
        self,
        base_config: PretrainedConfig | dict[str, Any] | None = None,
        encoder_layers: int = 0,
        decoder_layers: int = 0,
        num_loops: int = 4,
        gate_rank: int = 64,
        gate_init: float = 0.02,
        gate_floor: float = 0.0,
        input_injection: bool = False,
        kv_mode: str = "per_depth",
        depth_lora_rank: int = 0,
        depth_lora_alpha: float = 32.0,
        depth_lora_count: int = 1,
        use_cache: bool = True,
        **kwargs: Any,
    ):
        self.base_config = base_config
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.num_loops = num_loops
        self.gate_rank = gate_rank
        self.gate_init = gate_init
        self.gate_floor = gate_floor
        self.input_injection = input_injection
        self.kv_mode = kv_mode
        self.depth_lora_rank = depth_lora_rank
        self.depth_lora_alpha = depth_lora_alpha
        self.depth_lora_count = depth_lora_count
        self.use_cache = use_cache
        super().__init__(**kwargs)
        if isinstance(gate_init, bool) or not isinstance(gate_init, numbers.Real) or not 0.0 < gate_init < 1.0:
            raise ValueError(f"gate_init must be a number in (0, 1), got {gate_init!r}")
        if isinstance(gate_floor, bool) or not isinstance(gate_floor, numbers.Real) or not 0.0 <= gate_floor < gate_init:
            raise ValueError(f"gate_floor must be a number in [0, gate_init = {gate_init}), got {gate_floor!r}")
        if not isinstance(input_injection, bool):
            raise ValueError(f"input_injection must be true or false, got {input_injection!r}")
        check_num_loops(num_loops)
        check_int(gate_rank, "gate_rank", 1)
        check_int(depth_lora_rank, "depth_lora_rank", 0)
        check_int(depth_lora_count, "depth_lora_count", 1)
        if isinstance(depth_lora_alpha, bool) or not isinstance(depth_lora_alpha, numbers.Real) or depth_lora_alpha <= 0:
            raise ValueError(f"depth_lora_alpha must be a positive number, got {depth_lora_alpha!r}")
        check_int(encoder_layers, "encoder_layers", 0)
        check_int(decoder_layers, "decoder_layers", 0)
        if kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode must be one of {KV_MODES}, got {kv_mode!r}")
        if self.base_config is not None and encoder_layers + decoder_layers >= self.base_config.num_hidden_layers:
            raise SplitError(
                f"encoder_layers={encoder_layers} and decoder_layers={decoder_layers} leave no reasoning layer: "
                f"the base model has {self.base_config.num_hidden_layers} layers, so together they may take at "
                f"most {self.base_config.num_hidden_layers - 1}"
            )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "LoopUSConfig":
        """Refuse a stored config that does not describe a buildable model, naming its source.

        Without `base_config` (or its `model_type`) transformers would fill in a default-size base model
        (a 4096-wide, 32-layer Llama); a split out of range would fail deep in the forward pass.
        """
        name = kwargs.get("name_or_path")
        source = f"{name}/config.json" if name else "the LoopUS config"
        base = config_dict.get("base_config")
        if not isinstance(base, dict):
            raise CheckpointError(f"{source} has no base_config: it describes no base model, so the checkpoint "
                                  "cannot be built; restore the config.json saved with the weights")
        if "model_type" not in base:
            raise CheckpointError(f"{source}: its base_config has no model_type; restore the config.json saved "
                                  "with the weights")
        try:
            return super().from_dict(config_dict, **kwargs)
        except ValueError as err:
            raise CheckpointError(f"{source} is invalid: {err}") from None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "LoopUSConfig":
        """Refuse, before any model is built, a directory or hub id whose config is not a LoopUS one."""
        config_dict, _ = cls.get_config_dict(pretrained_model_name_or_path, **dict(kwargs))
        found = config_dict.get("model_type")
        if found != cls.model_type:
            raise CheckpointError(
                f"{pretrained_model_name_or_path} is not a LoopUS checkpoint (its config says model_type "
                f"{found!r}): convert it first with loopus.convert(...) or `loopus convert`"
            )
        kwargs.setdefault("name_or_path", str(pretrained_model_name_or_path))  # from_dict's errors name the source
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def reasoning_range(self) -> range:
        """Base-layer indices of the reasoning block."""
        return range(self.encoder_layers, self.base_config.num_hidden_layers - self.decoder_layers)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        """The wrapped model's config, where generation utilities read vocabulary and layer facts.

        A config of defaults only has none and answers for itself, as transformers' configs without a
        text sub-config do (its validators call this on every config built).
        """
        return self if self.base_config is None else self.base_config

    def require_base_config(self) -> PretrainedConfig:
        """The base model's config; refused where there is none, so no default-size base model is built."""
        if self.base_config is None:
            raise ValueError("this LoopUSConfig has no base_config (LoopUSConfig() only holds the defaults): "
                             "build a model with loopus.convert(base_model, ...) or load a saved checkpoint")
        return self.base_config
