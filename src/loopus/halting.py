"""The confidence head and the per-token exit strategies used for adaptive depth.

A token stops looping after pass n (1-based) when n >= min_loops and its strategy says so, or when
n == num_loops (the budget). Strategies, chosen per call (`exit_strategy=`):

    threshold    q_n >= threshold, q_n the confidence head's probability on the gated state h_n
    cdf          1 - prod_{s<=n} (1 - q_s) >= threshold: the cumulative halting probability
    convergence  ||h_n - h_{n-1}|| / ||h_{n-1}|| < threshold: relative change of the state
                 (h_0 is the encoder output); scale-free, so it works for any model's residual norms
    kl           KL(p_n || p_{n-1}) < threshold, p_n the model's next-token distribution decoded from
                 h_n (zero-shot, as in Huginn). It needs a decoder + head pass per loop, which costs
                 more than a reasoning pass on small models, and it cannot stop before pass 2.

`threshold` and `cdf` read the confidence head, which is only meaningful once trained (at
initialisation it says 0.5 for every token). `convergence` and `kl` work on an untrained model.
"""

from __future__ import annotations

from dataclasses import dataclass
import numbers
import warnings
from typing import Any

import torch
from torch import nn
from transformers import initialization as init

from .config import check_int, check_num_loops
from .deprecation import renamed_keyword
from .options import DEFAULT_THRESHOLDS, EXIT_STRATEGIES

STRATEGIES = EXIT_STRATEGIES


def check_threshold(value: Any) -> float:
    """An exit threshold: a real number (a string or a bool is refused, not converted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"exit_threshold must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


class ConfidenceHead(nn.Module):
    """sigmoid(w . rmsnorm(h) + b). It reads the same gated state the decoder reads, in training and at inference."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)

    def reset_parameters(self) -> None:
        init.zeros_(self.proj.weight)
        init.zeros_(self.proj.bias)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid confidence, shape (batch, seq); training uses it with a stable BCE."""
        h = hidden.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.proj(h.to(self.proj.weight.dtype)).squeeze(-1).float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(hidden))


@dataclass(frozen=True)
class ExitRule:
    """A validated exit strategy for one call: strategy, threshold and the loop range [min_loops, num_loops]."""

    strategy: str
    threshold: float
    min_loops: int
    num_loops: int

    @classmethod
    def build(
        cls, strategy: str | None, threshold: float | None, min_loops: int | None, num_loops: int | None = None,
        *, max_loops: int | None = None,
    ) -> "ExitRule | None":
        """None (fixed depth) when no strategy is given; otherwise check every knob and fill defaults."""
        num_loops = check_num_loops(renamed_keyword("ExitRule.build", "max_loops", "num_loops", max_loops, num_loops))
        if min_loops is not None:
            min_loops = check_int(min_loops, "min_loops", 1)
        if strategy is None or strategy == "none":
            if threshold is not None:
                raise ValueError("exit_threshold was given without an exit_strategy")
            if min_loops is not None and min_loops > num_loops:
                raise ValueError(f"min_loops={min_loops} is larger than the budget num_loops={num_loops}")
            return None
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown exit_strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
        min_loops = 1 if min_loops is None else min_loops
        if min_loops > num_loops:
            raise ValueError(f"min_loops={min_loops} is larger than the budget num_loops (max loops)={num_loops}")
        threshold = DEFAULT_THRESHOLDS[strategy] if threshold is None else check_threshold(threshold)
        if strategy in ("threshold", "cdf") and not 0.0 < threshold <= 1.0:
            raise ValueError(f"exit_threshold for {strategy!r} is a probability in (0, 1], got {threshold}")
        if strategy in ("convergence", "kl") and threshold < 0.0:
            raise ValueError(f"exit_threshold for {strategy!r} must be >= 0, got {threshold}")
        return cls(strategy, threshold, min_loops, num_loops)

    @property
    def max_loops(self) -> int:
        """Deprecated name of `num_loops`."""
        warnings.warn("ExitRule.max_loops is deprecated and will be removed: use num_loops", DeprecationWarning,
                      stacklevel=2)
        return self.num_loops

    @property
    def needs_distribution(self) -> bool:
        return self.strategy == "kl"

    @property
    def needs_confidence(self) -> bool:
        return self.strategy in ("threshold", "cdf")


class ExitTracker:
    """The exit bookkeeping of one forward: which batch rows still loop, how many passes each ran, and
    the running quantities some strategies need.

    Buffers are full-batch (batch, seq). `active` lists the rows the next pass computes (None: all).
    A row leaves when every one of its query tokens has met the rule; padding tokens (attention mask 0)
    never hold a row back. All work stays on the device except one host synchronisation per check,
    when the exit mask becomes the next set of active rows.
    """

    def __init__(self, rule: ExitRule, batch: int, seq: int, device: torch.device,
                 attention_mask: torch.Tensor | None = None):
        self.rule = rule
        self.batch = batch
        self.active: torch.LongTensor | None = None
        self.passes = torch.zeros(batch, dtype=torch.long, device=device)
        self.padding = attention_mask[:, -seq:] == 0 if attention_mask is not None and attention_mask.dim() == 2 else None
        self.survival = torch.ones(batch, seq, device=device) if rule.strategy == "cdf" else None
        self.previous_logprobs: torch.Tensor | None = None  # (batch, seq, vocab) for kl

    def wants_distribution(self, passes: int) -> bool:
        """Whether the kl strategy needs p_n after pass `passes` (p_{min_loops-1} and on)."""
        return self.rule.needs_distribution and passes >= max(self.rule.min_loops - 1, 1)

    def count_pass(self) -> None:
        """The active rows ran one more pass."""
        rows = self.active
        self.passes = self.passes + 1 if rows is None else self.passes.index_add(0, rows, torch.ones_like(rows))

    def update(
        self,
        passes: int,
        new_state: torch.Tensor,
        old_state: torch.Tensor,
        confidence: torch.Tensor | None = None,
        logprobs: torch.Tensor | None = None,
    ) -> bool:
        """Test the active rows' tokens after pass `passes`; drop the rows that are done. False once none is left."""
        done = self.done(self.active, passes, new_state, old_state, confidence, logprobs)
        if done is None:
            return True
        if self.padding is not None:
            done = done | (self.padding if self.active is None else self.padding.index_select(0, self.active))
        still = (~done.all(dim=-1)).nonzero().squeeze(-1)  # the one host sync of an exit check
        if still.numel() == 0:
            return False
        if still.numel() < done.shape[0]:
            self.active = still if self.active is None else self.active.index_select(0, still)
        return True

    def done(
        self,
        rows: torch.LongTensor | None,
        passes: int,
        new_state: torch.Tensor,
        old_state: torch.Tensor,
        confidence: torch.Tensor | None = None,
        logprobs: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Bool (rows, seq): tokens of `rows` that may stop after pass `passes`; None before min_loops."""
        rule = self.rule
        if rule.strategy == "cdf":
            survival = self.survival if rows is None else self.survival.index_select(0, rows)
            survival = survival * (1.0 - confidence)
            self.survival = survival if rows is None else self.survival.index_copy(0, rows, survival)
        previous = self.previous_logprobs
        if rule.strategy == "kl" and logprobs is not None:
            if rows is None:
                self.previous_logprobs = logprobs
            else:
                base = previous if previous is not None else logprobs.new_zeros((self.batch, *logprobs.shape[1:]))
                self.previous_logprobs = base.index_copy(0, rows, logprobs)
        if passes < rule.min_loops:
            return None
        if rule.strategy == "threshold":
            return confidence >= rule.threshold
        if rule.strategy == "cdf":
            return (1.0 - survival) >= rule.threshold
        if rule.strategy == "convergence":
            delta = (new_state - old_state).float().norm(dim=-1)
            return delta <= rule.threshold * old_state.float().norm(dim=-1).clamp_min(1e-12)
        # kl: KL(p_n || p_{n-1}) over the vocabulary
        if previous is None:
            return torch.zeros(new_state.shape[:2], dtype=torch.bool, device=new_state.device)
        previous = previous if rows is None else previous.index_select(0, rows)
        kl = (logprobs.exp() * (logprobs - previous)).sum(-1)
        return kl <= rule.threshold
