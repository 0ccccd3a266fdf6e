"""loopus: recast pretrained LLMs as looped latent-refinement (LoopUS) models."""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import LoopKVCache
from .checkpoint import CheckpointError
from .config import LoopUSConfig, SplitError, register_peft_defaults
from .convert import UnsupportedArchitectureError, convert
from .errors import LoopUSError
from .modeling import LoopUSForCausalLM

AutoConfig.register("loopus", LoopUSConfig)
AutoModelForCausalLM.register(LoopUSConfig, LoopUSForCausalLM)
register_peft_defaults()

__all__ = [
    "CheckpointError",
    "LoopKVCache",
    "LoopUSConfig",
    "LoopUSError",
    "LoopUSForCausalLM",
    "SplitError",
    "UnsupportedArchitectureError",
    "convert",
]
__version__ = "0.1.0"

from .eval import register_lm_eval as _register_lm_eval  # noqa: E402  (lazy: the adapter loads on first use)

_register_lm_eval()
