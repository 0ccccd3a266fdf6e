"""Evaluation: the lm-evaluation-harness model `loopus`, offline task configs, per-loop perplexity, reports.

lm-eval has no plugin hook for outside models. `register_lm_eval()` puts a *lazy* entry
(`"loopus" -> "loopus.eval.lm_eval_model:LoopUSLM"`) into lm-eval's model registry, so that
`lm_eval.simple_evaluate(model="loopus", ...)` and `lm_eval.api.registry.get_model("loopus")` work
without importing the adapter (or torch-heavy parts of lm-eval) until the model is actually used.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LM_EVAL_MODEL = "loopus.eval.lm_eval_model:LoopUSLM"

# The tasks shipped under TASKS_DIR, reading the data directory ($LOOPUS_DATA).
SHIPPED_TASKS = (
    "wikitext",
    "lambada_openai",
    "hellaswag",
    "arc_easy",
    "arc_challenge",
    "piqa",
    "mmlu",
    "winogrande",
    "openbookqa",
    # reasoning, answer only (per-depth tasks, and groups that report every depth)
    "prontoqa",
    *(f"prontoqa_{h}hop" for h in range(1, 5)),
    "prontoqa_ladder",
    "prosqa",
    "gsm8k_nocot",
    "mult_4x4",
    "mult_5x5",
    "depthchain",
    *(f"depthchain_k{k}" for k in range(1, 17)),
)


def register_lm_eval() -> None:
    """Register the `loopus` model with lm-eval's registry (lazily); `import loopus` calls it."""
    import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own lazy entries first)
    from lm_eval.api.registry import model_registry

    if "loopus" not in model_registry:
        model_registry.register("loopus", target=LM_EVAL_MODEL)


class _QuietCustomDataset:
    def filter(self, record) -> bool:
        return "Custom kwargs can be passed" not in str(record.getMessage())


def quiet_task_logs() -> None:
    """Our tasks deliberately override lm-eval's same-named hub tasks: don't warn once per MMLU subject,
    nor print lm-eval's generic "custom kwargs" hint once per task built from a `custom_dataset`."""
    import logging

    logging.getLogger("lm_eval.tasks._index").setLevel(logging.ERROR)
    task_log = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _QuietCustomDataset) for f in task_log.filters):
        task_log.addFilter(_QuietCustomDataset())


def task_manager(include_defaults: bool = True, **kwargs):
    """An lm-eval `TaskManager` that knows the offline tasks shipped with loopus (they take precedence)."""
    from lm_eval.tasks import TaskManager

    quiet_task_logs()
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults, **kwargs)
