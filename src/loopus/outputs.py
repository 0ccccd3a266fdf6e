"""The output of a LoopUS forward: the causal-LM fields plus what each loop produced."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast


@dataclass
class LoopUSCausalLMOutput(CausalLMOutputWithPast):
    """Causal-LM output plus, on request, what each loop produced.

    loop_hidden_states: the gated state h_t after each loop, num_loops tensors of (batch, seq, hidden).
    loop_confidences: the confidence head's probability per token and loop, (batch, seq, num_loops).
    gate_coefficients: the gate's mixing share `a` per loop from loop 2 on, (batch, seq, hidden) each.
    last_hidden_state: the final-normed decoder output, (batch, seq, hidden), always returned, so a
        caller that needs logits at a few positions only (scoring continuations) applies `lm_logits`
        there itself and asks for `logits_to_keep=1`.
    loop_passes: reasoning passes each token ran, (batch, seq), always returned. With adaptive exit
        the loop may stop before num_loops; the per-loop tuples above then have one entry per pass
        run, and a row that had exited keeps its last state (gate coefficient 0) in later entries.
    """

    loop_hidden_states: tuple[torch.Tensor, ...] | None = None
    loop_confidences: torch.Tensor | None = None
    gate_coefficients: tuple[torch.Tensor, ...] | None = None
    last_hidden_state: torch.Tensor | None = None
    loop_passes: torch.LongTensor | None = None
