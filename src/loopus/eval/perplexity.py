"""Per-loop perplexity: one pass of the encoder and the loop, decoded at every requested loop count.

Text is cut into disjoint windows of `window` tokens, each scored after a BOS token, so every token
is predicted exactly once (the disjoint-window protocol). Given several documents, each is windowed on
its own, so no window spans a document boundary. The standard error of the mean NLL is estimated
across windows (a ratio estimator, since the last window of a document is shorter): it is what
tells a 1% difference from noise. The loop runs once up to the largest
count and the decoder is applied to the state after each requested count, which costs
max(loops) reasoning passes instead of sum(loops).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..modeling import LoopUSForCausalLM
from ..text import IGNORE_INDEX, read_documents, token_windows

# held-out text of the shipped corpora: name -> file in the data directory
HELD_OUT = {"enwiki": "enwiki/valid.jsonl", "eltec_eng": "eltec_eng/valid.jsonl", "wikitext2": "wikitext2/wiki.test.raw"}


def held_out_documents(name: str, data: str | None = None) -> list[str]:
    """The documents of a held-out corpus (`HELD_OUT`): one per JSONL line, or a raw text file as one."""
    from ..paths import data_file

    if name not in HELD_OUT:
        raise ValueError(f"unknown held-out corpus {name!r}; choose from {', '.join(HELD_OUT)}")
    return read_documents(data_file(HELD_OUT[name], data))


@torch.no_grad()
def per_loop_perplexity(
    model: LoopUSForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    text: str | Sequence[str],
    loops: Iterable[int] = (1, 2, 4, 8),
    max_tokens: int | None = 4096,
    window: int = 512,
    batch_size: int = 4,
    progress: bool = True,
    return_windows: bool = False,
) -> dict[int, dict[str, float]]:
    """Perplexity, mean NLL, its standard error `nll_se` and the token count at each loop count.

    `text` is one string or a sequence of documents; `max_tokens` caps the total over documents.
    With `return_windows`, each entry also holds `windows`: the (NLL sum, tokens) of every window,
    in order, so two models scored on the same text can be compared window by window (paired).
    """
    loops = sorted(set(int(n) for n in loops))
    if not loops or loops[0] < 1:
        raise ValueError(f"loop counts must be >= 1, got {loops}")
    documents = [text] if isinstance(text, str) else list(text)
    pieces, total = [], 0
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        if len(ids) >= 2:
            # (inputs, labels): every token predicted once, from its own window only
            pieces.extend((w[:-1], w[1:]) for w in token_windows(ids, tokenizer.bos_token_id, window, carry_previous=True))
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not pieces:
        raise ValueError("need at least 2 tokens of text to measure perplexity")
    window_nll = {n: [] for n in loops}
    counts: list[int] = []
    model.eval()
    device = next(model.parameters()).device
    batches = [pieces[i : i + batch_size] for i in range(0, len(pieces), batch_size)]
    for batch in tqdm(batches, desc="perplexity", disable=not progress):
        width = max(len(inputs) for inputs, _ in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (inputs, target) in enumerate(batch):
            input_ids[row, : len(inputs)] = torch.tensor(inputs)
            labels[row, : len(target)] = torch.tensor(target)
            mask[row, : len(inputs)] = 1
        input_ids, labels, mask = input_ids.to(device), labels.to(device), mask.to(device)
        for n, _, hidden in model.per_loop_hidden(input_ids, loops, mask):
            logits = model.lm_logits(hidden).float()
            token_nll = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
            ).view(labels.shape)
            window_nll[n].extend(token_nll.sum(1).tolist())
        counts.extend((labels != IGNORE_INDEX).sum(1).tolist())
    out = {}
    for n in loops:
        mean, se = mean_and_se(window_nll[n], counts)
        out[n] = {"ppl": math.exp(mean), "nll": mean, "nll_se": se, "tokens": sum(counts)}
        if return_windows:
            out[n]["windows"] = list(zip(window_nll[n], counts))
    return out


def mean_and_se(sums: Sequence[float], counts: Sequence[int]) -> tuple[float, float]:
    """Mean per token of windowed sums, and its standard error across windows (ratio estimator).

    Paired differences of two models' window sums give the standard error of their difference.
    """
    total = sum(counts)
    mean = sum(sums) / total
    k = len(sums)
    if k < 2:
        return mean, float("nan")
    size = total / k
    residual = sum(((s - mean * c) / size) ** 2 for s, c in zip(sums, counts))
    return mean, math.sqrt(residual / (k * (k - 1)))
