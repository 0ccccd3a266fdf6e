"""loopus: recast pretrained LLMs as looped latent-refinement (LoopUS) models.

`import loopus` registers LoopUS with transformers' `AutoConfig` / `AutoModelForCausalLM`, PEFT's
default LoRA targets and lm-eval's model registry (`register`). The one exception is the `loopus`
command itself: it registers when a command runs, not on import, so that `loopus --help` and
argument errors do not wait seconds for torch; the public names below are bound when it registers.
"""

from __future__ import annotations

import importlib
import os
import sys
_EXPORTS = {
    "CheckpointError": "checkpoint",
    "LoopKVCache": "cache",
    "LoopUSConfig": "config",
    "LoopUSError": "errors",
    "LoopUSForCausalLM": "modeling",
    "SplitError": "config",
    "UnsupportedArchitectureError": "convert",
    "convert": "convert",
}
__all__ = [*sorted(_EXPORTS), "register"]
__version__ = "0.1.0"


def register() -> None:
    """Register LoopUS with transformers' Auto classes, PEFT and lm-eval; calling it again changes nothing."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .config import LoopUSConfig, register_peft_defaults
    from .eval import register_lm_eval
    from .modeling import LoopUSForCausalLM

    AutoConfig.register("loopus", LoopUSConfig, exist_ok=True)
    AutoModelForCausalLM.register(LoopUSConfig, LoopUSForCausalLM, exist_ok=True)
    register_peft_defaults()
    register_lm_eval()
    # bound here, not looked up lazily: importing the submodule `loopus.convert` would otherwise leave the
    # module, not the function, under the name `loopus.convert`
    for name, module in _EXPORTS.items():
        globals()[name] = getattr(importlib.import_module(f".{module}", __name__), name)


def _started_as_command() -> bool:
    """Whether this process is the `loopus` command: its console script, or `python -m loopus.cli`."""
    argv = getattr(sys, "orig_argv", [])
    if "-m" in argv:
        return argv[argv.index("-m") + 1 : argv.index("-m") + 2] == ["loopus.cli"]
    return os.path.basename(sys.argv[0]) in ("loopus", "loopus.exe", "loopus-script.py")


if not _started_as_command():
    register()
