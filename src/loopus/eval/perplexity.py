"""Per-loop perplexity: one pass of the encoder and the loop, decoded at every requested loop count.

Text is cut into disjoint windows of `window` tokens, each scored after a BOS token, so every token
is predicted exactly once (the disjoint-window protocol). The loop runs once up to the largest
count and the decoder is applied to the state after each requested count, which costs
max(loops) reasoning passes instead of sum(loops).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..modeling import LoopUSForCausalLM


def _windows(ids: list[int], bos: int | None, window: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, labels) pairs that predict every token once; labels -100 mark the BOS slot."""
    pieces = []
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        prefix = [bos] if bos is not None else ids[max(0, start - 1) : start]
        inputs = prefix + chunk[:-1] if prefix else chunk[:-1]
        labels = chunk if prefix else chunk[1:]
        pieces.append((inputs, labels))
    return pieces


@torch.no_grad()
def per_loop_perplexity(
    model: LoopUSForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    loops: Iterable[int] = (1, 2, 4, 8),
    max_tokens: int | None = 4096,
    window: int = 512,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[int, dict[str, float]]:
    """Perplexity (and mean NLL, token count) of `text` at each loop count in `loops`."""
    loops = sorted(set(int(n) for n in loops))
    if not loops or loops[0] < 1:
        raise ValueError(f"loop counts must be >= 1, got {loops}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("need at least 2 tokens of text to measure perplexity")
    pieces = _windows(ids, tokenizer.bos_token_id, window)
    nll = {n: 0.0 for n in loops}
    count = 0
    model.eval()
    device = next(model.parameters()).device
    batches = [pieces[i : i + batch_size] for i in range(0, len(pieces), batch_size)]
    for batch in tqdm(batches, desc="perplexity", disable=not progress):
        width = max(len(inputs) for inputs, _ in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (inputs, target) in enumerate(batch):
            input_ids[row, : len(inputs)] = torch.tensor(inputs)
            labels[row, : len(target)] = torch.tensor(target)
            mask[row, : len(inputs)] = 1
        input_ids, labels, mask = input_ids.to(device), labels.to(device), mask.to(device)
        embeds = model.get_input_embeddings()(input_ids)
        ctx = model.layer_context(embeds, mask, None, None)
        state = model.encode(embeds, ctx)
        for depth in range(loops[-1]):
            state, _ = model.loop_step(state, ctx, depth)
            if depth + 1 in nll:
                logits = model.lm_logits(model.decode(state, ctx)).float()
                nll[depth + 1] += torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
                ).item()
        count += int((labels != -100).sum())
    return {n: {"ppl": math.exp(nll[n] / count), "nll": nll[n] / count, "tokens": count} for n in loops}
