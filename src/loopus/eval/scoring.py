"""Scoring the benchmarks share: held-out perplexity of every held-out corpus at several loop counts, and
teacher-forced decoding token by token through the cache (where per-token exit applies)."""

from __future__ import annotations

import math
import time

import torch

from ..cache import loop_stats
from .perplexity import HELD_OUT, held_out_documents, per_loop_perplexity


def held_out_scores(model, tokenizer, loops: list[int], data: str | None = None, tokens: int | None = None,
                    window: int = 512, batch_size: int = 4) -> dict[str, dict[str, dict]]:
    """{corpus: {loop count: scores with per-window sums}} over `HELD_OUT`, the first `tokens` of each."""
    result = {}
    for name in HELD_OUT:
        scores = per_loop_perplexity(model, tokenizer, held_out_documents(name, data), loops, max_tokens=tokens,
                                     window=window, batch_size=batch_size, return_windows=True)
        result[name] = {str(n): v for n, v in scores.items()}
    return result


def teacher_forced(model, ids: torch.Tensor, context: int, budget: int, kv_mode: str, **exit_kwargs) -> dict:
    """Perplexity of ids[context:] predicted one token at a time through the cache, with per-token exit."""
    cache = model.new_cache(budget, kv_mode)
    nll, passes, seconds = 0.0, [], 0.0
    with torch.no_grad():
        out = model(input_ids=ids[:, :context], past_key_values=cache, num_loops=budget, logits_to_keep=1)
        logits = out.logits[:, -1]
        for pos in range(context, ids.shape[1]):
            target = ids[:, pos]
            nll += torch.nn.functional.cross_entropy(logits.float(), target).item()
            if pos == ids.shape[1] - 1:
                break
            start = time.perf_counter()
            out = model(input_ids=ids[:, pos : pos + 1], past_key_values=cache, num_loops=budget, **exit_kwargs)
            seconds += time.perf_counter() - start
            passes.append(int(out.loop_passes[0, 0]))
            logits = out.logits[:, -1]
    count = ids.shape[1] - context
    stats = loop_stats(torch.tensor(passes))
    return {
        "ppl": math.exp(nll / count), "tokens": count, "mean_passes": stats["mean"],
        "histogram": stats["histogram"], "seconds_per_token": seconds / max(len(passes), 1),
    }
