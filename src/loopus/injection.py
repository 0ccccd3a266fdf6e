"""Input injection: the encoder output h_0 fed into every pass of the reasoning block from loop 2 on.

    input of pass t  =  h_{t-1} + W h_0      (t >= 2; the first pass reads h_0 itself)

Without it a loop sees only its own last state, so a deep loop has no direct view of the problem;
Huginn, Parcae and McLeish et al. (2025) all feed the input into every iteration. `W` starts at zero,
so at initialisation every loop count computes exactly what it computes without injection, and the
injection has to be learned. Per-channel RMS normalisation of h_0 keeps `W`'s scale independent of the
residual stream's norm (hundreds in real models).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from .gate import rms_normalized


class InputInjection(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        # a parameter of its own, not an nn.Linear: transformers' post_init then hands this module to
        # `_init_weights`, which zeroes it
        self.weight = nn.Parameter(torch.empty(hidden_size, hidden_size))

    def reset_parameters(self) -> None:
        init.zeros_(self.weight)

    def forward(self, anchor: torch.Tensor) -> torch.Tensor:
        """W norm(h_0): what a pass from loop 2 on adds to its input."""
        x = rms_normalized(anchor).to(self.weight.dtype)
        return nn.functional.linear(x, self.weight).to(anchor.dtype)
