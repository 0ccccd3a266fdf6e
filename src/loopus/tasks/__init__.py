"""Synthetic reasoning tasks that the package generates (no download): data files for SFT and lm-eval.

Light at import (standard library only), so the `loopus make-task` verb answers at once.
"""

from .depthchain import TASK_DIR as DEPTHCHAIN_DIR, make_item, write_depthchain

__all__ = ["DEPTHCHAIN_DIR", "make_item", "write_depthchain"]
