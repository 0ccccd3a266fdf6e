"""The one place where loopus adapts to the installed `transformers` release.

transformers 5.24 renamed `gradient_checkpointing_enable`/`_disable` to `activation_checkpointing_*`
(the old names warn), and the KV-cache argument from `past_key_values` to `cache` in the mask
builders, in every decoder layer's `forward`, in `GenerationMixin` and in the model outputs (the old
name stays a deprecated alias until 5.40). Passing the old name next to generation's new one makes a
layer receive both and write into the wrong cache. So loopus never hard-codes either name: it asks
the public signature of the function it is about to call which one that function takes.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from transformers import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_NAMES = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def cache_kwarg(fn: Callable) -> str:
    """The name under which `fn` takes the KV cache: "cache" (transformers >= 5.24) or "past_key_values"."""
    parameters = inspect.signature(fn).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise TypeError(f"{getattr(fn, '__qualname__', fn)} takes no KV cache argument (looked for {CACHE_NAMES})")


MASK_CACHE_KWARG = cache_kwarg(create_causal_mask)
GENERATION_CACHE_KWARG = cache_kwarg(GenerationMixin.prepare_inputs_for_generation)
OUTPUT_CACHE_FIELD = next(name for name in CACHE_NAMES if name in CausalLMOutputWithPast.__dataclass_fields__)


def output_cache(output: Any) -> Any:
    """The KV cache held by a model or `generate` output, whichever name this release gives it."""
    for name in CACHE_NAMES:
        if name in output.__dataclass_fields__:
            return getattr(output, name)
    raise TypeError(f"{type(output).__name__} holds no KV cache field")


def checkpointing_method(model: Any, action: str) -> Callable[..., None]:
    """`model.activation_checkpointing_{action}` (transformers >= 5.24), else 5.22's
    `gradient_checkpointing_{action}`; `action` is "enable" or "disable"."""
    return getattr(model, f"activation_checkpointing_{action}", None) or getattr(model, f"gradient_checkpointing_{action}")
