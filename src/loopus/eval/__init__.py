"""Evaluation: perplexity per loop count, and the lm-evaluation-harness adapter."""
