"""MMLU loader for the YAMLs in this folder (lm-eval resolves `!function` relative to the YAML)."""

from loopus.eval.tasks.utils import load_mmlu  # noqa: F401
