"""The confidence head: one probability per token per loop that further loops are not needed."""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init


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
