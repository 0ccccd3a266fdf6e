"""Validation: loss at several loop counts, and how well the confidence head is calibrated.

One pass of the encoder and the loop up to the largest count; the decoder is applied after each
requested count. The confidence target is the one used in training (see `objective`), with the
deepest evaluated count as the reference. Calibration is reported as the expected calibration
error over 10 equal-width bins (ECE), the Brier score, and the share of tokens that would exit at
a 0.5 threshold. Every statistic is a sum, so processes can all-reduce them.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from ..looped import looped_view
from .objective import chunked_cross_entropy, confidence_targets, RDSConfig

BINS = 10


@torch.no_grad()
def loop_statistics(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], loops: list[int],
                    cfg: RDSConfig = RDSConfig(), device=None) -> torch.Tensor:
    """Sums per loop count (`model.loop_counts(loops)`): rows = loops, columns = [nll, tokens, correct, conf,
    target, brier, exit@0.5, then BINS x (count, conf sum, target sum)]; the confidence columns stay 0 for a
    model without a confidence head."""
    model = looped_view(model)
    loops = model.loop_counts(loops)
    stats = torch.zeros(len(loops), 7 + 3 * BINS, dtype=torch.float64, device=device)
    for input_ids, labels in batches:
        input_ids, labels = input_ids.to(device), labels.to(device)
        per_loop = []
        for _, state, hidden in model.per_loop_hidden(input_ids, loops):
            ce = chunked_cross_entropy(hidden, labels, model.lm_logits, cfg.ce_chunk)
            head = model.confidence_head
            per_loop.append((ce, head(state)[ce.valid].double() if head is not None else None))
        ref = per_loop[-1][0]
        for row, (ce, conf) in enumerate(per_loop):
            stats[row, 0] += ce.nll.double().sum()
            stats[row, 1] += ce.count
            stats[row, 2] += (ce.pred == labels[ce.valid]).sum()
            if conf is None:
                continue
            target = confidence_targets(ce.nll, ce.pred, ref.nll, ref.pred, cfg.conf_margin).double()
            stats[row, 3] += conf.sum()
            stats[row, 4] += target.sum()
            stats[row, 5] += ((conf - target) ** 2).sum()
            stats[row, 6] += (conf >= 0.5).sum()
            bins = (conf * BINS).long().clamp(max=BINS - 1)
            for b in range(BINS):
                sel = bins == b
                stats[row, 7 + 3 * b] += sel.sum()
                stats[row, 8 + 3 * b] += conf[sel].sum()
                stats[row, 9 + 3 * b] += target[sel].sum()
    return stats


def summarize(stats: torch.Tensor, loops: list[int], calibrated: bool = True) -> dict[str, dict[str, float]]:
    """Per loop count (rows of `stats`, in order): loss, perplexity, accuracy and, `calibrated`, the
    confidence head's calibration."""
    out = {}
    for row, n in enumerate(loops):
        s = stats[row].tolist()
        tokens = max(s[1], 1.0)
        entry = {"loss": s[0] / tokens, "ppl": math.exp(min(s[0] / tokens, 50.0)), "acc": s[2] / tokens,
                 "tokens": int(s[1])}
        if calibrated:
            ece = sum(abs(s[8 + 3 * b] - s[9 + 3 * b]) for b in range(BINS)) / tokens
            entry.update(conf=s[3] / tokens, conf_target=s[4] / tokens, brier=s[5] / tokens,
                         exit_at_0_5=s[6] / tokens, ece=ece)
        out[str(n)] = entry
    return out


def evaluate(model, batches, loops: list[int], cfg: RDSConfig = RDSConfig(), device=None,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Validation metrics keyed by loop count (a plain causal LM reports its one loop, "1")."""
    was_training = model.training
    model.eval()
    try:
        stats = loop_statistics(model, batches, loops, cfg, device)
    finally:
        model.train(was_training)
    if reduce is not None:
        stats = reduce(stats)
    view = looped_view(model)
    return summarize(stats, view.loop_counts(loops), calibrated=view.confidence_head is not None)
