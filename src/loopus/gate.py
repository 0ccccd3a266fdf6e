"""The selective gate that mixes each loop's proposal with the previous state.

ZOH-style form: a = exp(-softplus(W_up W_down norm(h~ - h) + b) * exp(A_log)), h' = a*h~ + (1-a)*h.
`a` lies in (0, 1) per token and per channel, so the state is always a convex combination of the
proposal and the previous state and cannot run away however often the block is applied. The
difference is RMS-normalised first because residual streams of real models have norms in the
hundreds. `W_up` starts at zero, so at initialisation `a` is the constant `gate_init` everywhere and
training learns the input dependence from there.

With a floor f > 0 the share is a = f + (1 - f) * exp(...), so it can never fall below f: a gate
that closes is one way a trained loop switches itself off, and the floor takes that way away. The
bias is set so that the share still starts at exactly `gate_init`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init


def rms_normalized(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32 scaled to unit RMS over its last dimension: residual streams of real models have norms
    in the hundreds, which would otherwise set the scale of what reads them."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class SelectiveGate(nn.Module):
    def __init__(self, hidden_size: int, rank: int, gate_init: float, gate_floor: float = 0.0):
        super().__init__()
        self.gate_init = gate_init
        self.gate_floor = gate_floor
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=True)
        self.A_log = nn.Parameter(torch.zeros(hidden_size))

    def reset_parameters(self) -> None:
        """exp(-softplus(b)) = s at start, i.e. b = log(1/s - 1), for the share s above the floor that gives
        a = gate_init."""
        init.normal_(self.down.weight, std=self.down.in_features**-0.5)
        init.zeros_(self.up.weight)
        share = (self.gate_init - self.gate_floor) / (1.0 - self.gate_floor)
        init.constant_(self.up.bias, math.log(1.0 / share - 1.0))
        init.zeros_(self.A_log)

    def coefficient(self, proposal: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """The share `a` of the proposal kept, shape like the states."""
        delta = rms_normalized(proposal - previous)
        rate = nn.functional.softplus(self.up(self.down(delta.to(self.down.weight.dtype))).float())
        a = torch.exp(-rate * torch.exp(self.A_log.float()))
        if self.gate_floor:
            a = self.gate_floor + (1.0 - self.gate_floor) * a
        return a.to(proposal.dtype)

    def forward(self, proposal: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.coefficient(proposal, previous)
        return a * proposal + (1 - a) * previous, a
