"""Closed-set answer scoring: the log-likelihood of each answer option of an item, at several loop counts
from one forward, and under adaptive exit. Cheaper than lm-eval for a study that scores thousands of
items at many loop counts, and paired item by item across models.

Tokens are those supervised fine-tuning trains on (`train.sft`): the sequence start (Gemma: its BOS),
the prompt, then the option, tokenised apart. When the options' tokens differ only in their last one
(Gemma: " True" -> [▁True], " 6" -> [▁, 6]), one forward of prompt + shared prefix scores every option
from the last position's distribution; otherwise each option is a row of its own and its log-likelihood
is the sum over its tokens. Rows are right-padded: the model is causal, so a real token never sees the
padding after it and needs no attention mask.

Loop counts: a LoopUS model runs the encoder once and the loop to the largest count, decoding after
each requested one (`per_loop_hidden`), so loop count n is exactly the uncached forward at n loops. A
plain causal LM (a dense fine-tune) has one depth and is scored at loop count 1 only.

Adaptive exit scores the answer as generation would produce it: the prompt up to its last token is
prefilled at the full budget through the KV cache (as `generate` prefills), then every answer position
runs as a cached decode step of one token under the exit rule, where the rule applies per token (the
model applies it per batch row, and a decode step here is one row of one token). `loop_passes` is the
reasoning passes of the position whose distribution tells the options apart (the last one before the
options' first distinct token: after " True"/" False"'s prompt, or after the "▁" of " 0".." 9"). Exit
scoring runs one item at a time and costs one more forward at the full budget per item.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..halting import ExitRule
from ..modeling import LoopUSForCausalLM, soft_cap
from ..train.sft import sequence_start


@dataclass(frozen=True)
class OptionItem:
    """A test item: the prompt, its answer options (with their leading space) and the right one's index."""

    prompt: str
    options: tuple[str, ...]
    gold: int
    depth: int
    id: str = ""


@dataclass(frozen=True)
class Encoded:
    context: list[int]  # sequence start + prompt
    options: list[list[int]]

    @property
    def shares_prefix(self) -> bool:
        """Whether all options are one token after a common prefix (one forward scores them all)."""
        first = self.options[0]
        return bool(first) and all(len(o) == len(first) and o[:-1] == first[:-1] for o in self.options)


def encode_item(tokenizer, item: OptionItem, start: list[int]) -> Encoded:
    if not item.options or not 0 <= item.gold < len(item.options):
        raise ValueError(f"item {item.id or item.prompt[:40]!r}: gold index {item.gold} is not one of its "
                         f"{len(item.options)} options")
    ids = tokenizer([item.prompt, *item.options], add_special_tokens=False)["input_ids"]
    if not all(ids[1:]):
        raise ValueError(f"item {item.id or item.prompt[:40]!r}: an option tokenises to nothing")
    return Encoded(start + ids[0], ids[1:])


def is_looped(model) -> bool:
    return isinstance(model, LoopUSForCausalLM)


def exit_label(rule: ExitRule) -> str:
    return f"{rule.strategy}={rule.threshold:g}"


def parse_exit_rules(specs: Iterable[str], budget: int) -> list[ExitRule]:
    """`threshold`, `cdf=0.8`, ... (a strategy, optionally `=THRESHOLD`) as validated rules at `budget` loops."""
    rules = []
    for spec in specs:
        strategy, _, value = spec.partition("=")
        try:
            threshold = float(value) if value else None
        except ValueError:
            raise ValueError(f"exit rule {spec!r}: the threshold after '=' must be a number") from None
        rules.append(ExitRule.build(strategy.strip(), threshold, None, budget))
    return rules


def _hidden_per_loop(model, ids: torch.Tensor, loops: Sequence[int]) -> Iterator[tuple[int, torch.Tensor]]:
    """(loop count, final-normed decoder output) per loop count; a plain causal LM gives its one depth."""
    if is_looped(model):
        for n, _, hidden in model.per_loop_hidden(ids, loops):
            yield n, hidden
    else:
        with torch.no_grad():
            yield 1, model.base_model(input_ids=ids).last_hidden_state


def _log_probs(model, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities from final-normed hidden states (Gemma's soft cap included)."""
    if is_looped(model):
        logits = model.lm_logits(hidden)
    else:
        logits = soft_cap(model.lm_head(hidden), getattr(model.config, "final_logit_softcapping", None))
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def _rows_log_probs(model, rows: list[list[int]], positions: list[list[int]], loops: Sequence[int],
                    pad_id: int) -> dict[int, list[torch.Tensor]]:
    """{loop count: per row, log-probs (len(positions[r]), vocab) at its `positions`}: one padded forward."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=model.device)
    row_index = torch.tensor([r for r, pos in enumerate(positions) for _ in pos], device=model.device)
    flat = torch.tensor([p for pos in positions for p in pos], device=model.device)
    sizes = [len(pos) for pos in positions]
    return {n: list(_log_probs(model, hidden[row_index, flat]).split(sizes))
            for n, hidden in _hidden_per_loop(model, ids, loops)}


def _result(loglik: list[float], gold: int) -> dict:
    best = max(range(len(loglik)), key=loglik.__getitem__)
    return {"loglik": loglik, "correct": best == gold}


def _prefix_loglik(lp: torch.Tensor, prefix: list[int]) -> torch.Tensor:
    """Sum of the log-probs (rows of `lp`, one per position) of the tokens `prefix`."""
    return lp[torch.arange(len(prefix)), torch.tensor(prefix, dtype=torch.long)].sum()


def _shared_logliks(lp: torch.Tensor, e: Encoded) -> list[float]:
    """Option log-likelihoods from the log-probs at the shared prefix's positions and the scored one."""
    prefix = e.options[0][:-1]
    return (_prefix_loglik(lp, prefix) + lp[len(prefix), [o[-1] for o in e.options]]).tolist()


def _fixed_shared(model, batch: list[Encoded], loops: Sequence[int], pad_id: int) -> list[dict[int, list[float]]]:
    """Option log-likelihoods of items whose options share all but their last token: one row per item."""
    rows = [e.context + e.options[0][:-1] for e in batch]
    positions = [list(range(len(e.context) - 1, len(r))) for e, r in zip(batch, rows)]
    per_loop = _rows_log_probs(model, rows, positions, loops, pad_id)
    return [{n: _shared_logliks(lp[i], e) for n, lp in per_loop.items()} for i, e in enumerate(batch)]


def _fixed_per_option(model, batch: list[Encoded], loops: Sequence[int], pad_id: int) -> list[dict[int, list[float]]]:
    """Option log-likelihoods, one row per (item, option): the sum of the option's token log-probs."""
    rows, positions, targets, owners = [], [], [], []
    for i, e in enumerate(batch):
        for option in e.options:
            rows.append(e.context + option)
            positions.append(list(range(len(e.context) - 1, len(e.context) - 1 + len(option))))
            targets.append(option)
            owners.append(i)
    per_loop = _rows_log_probs(model, rows, positions, loops, pad_id)
    out: list[dict[int, list[float]]] = [{n: [] for n in per_loop} for _ in batch]
    for n, lps in per_loop.items():
        for lp, target, i in zip(lps, targets, owners):
            out[i][n].append(float(_prefix_loglik(lp, target)))
    return out


@torch.no_grad()
def _decode(model, ids: list[int], cache, rule: ExitRule) -> tuple[torch.Tensor, int]:
    """One cached decode step of token(s) `ids` under `rule`: (log-probs of the last position, its passes)."""
    out = model(input_ids=torch.tensor([ids], device=model.device), past_key_values=cache, num_loops=rule.num_loops,
                exit_strategy=rule.strategy, exit_threshold=rule.threshold, prefill_exit=True, logits_to_keep=1)
    return torch.log_softmax(out.logits[0, -1].float(), dim=-1), int(out.loop_passes[0, -1])


def _common_prefix(options: list[list[int]]) -> list[int]:
    """The tokens every option starts with, leaving each at least one of its own."""
    common = []
    for column in zip(*options):
        if len(set(column)) > 1:
            break
        common.append(column[0])
    return common[: min(len(o) for o in options) - 1]


@torch.no_grad()
def _exit_scores(model, e: Encoded, rules: Sequence[ExitRule]) -> dict[str, tuple[list[float], int]]:
    """{rule label: (option log-likelihoods, passes of the position that tells the options apart)}."""
    budget = rules[0].num_loops
    cache = model.new_cache(budget)
    if len(e.context) > 1:  # the prompt before the first answer position, at the full budget as in generation
        model(input_ids=torch.tensor([e.context[:-1]], device=model.device), past_key_values=cache,
              num_loops=budget, logits_to_keep=1)
    common = _common_prefix(e.options)
    out = {}
    for rule in rules:
        branch = copy.deepcopy(cache)
        lp, passes = _decode(model, e.context[-1:], branch, rule)
        shared = 0.0
        for token in common:
            shared += float(lp[token])
            lp, passes = _decode(model, [token], branch, rule)
        logliks = []
        for option in e.options:
            rest = option[len(common):]
            total, step = shared + float(lp[rest[0]]), copy.deepcopy(branch) if len(rest) > 1 else None
            for prev, token in zip(rest, rest[1:]):
                here, _ = _decode(model, [prev], step, rule)
                total += float(here[token])
            logliks.append(total)
        out[exit_label(rule)] = (logliks, passes)
    return out


def score_items(model, tokenizer, items: Sequence[OptionItem], loops: Sequence[int] = (1, 2, 4, 8, 16),
                exit_rules: Sequence[ExitRule] = (), batch_size: int = 8, shared_prefix: bool = True,
                progress: bool = True, desc: str = "score") -> Iterator[dict]:
    """Per item, in order: {"id", "depth", "gold", "fixed": {n: {"loglik", "correct"}}, "exit": {rule:
    {"loglik", "correct", "loop_passes"}}}. Yields batch by batch, so a caller can save as it goes.

    `shared_prefix=False` scores every option as its own row even where one forward would do (a check).
    A plain causal LM is scored at loop count 1 only and takes no exit rules.
    """
    loops = sorted({int(n) for n in loops})
    if not loops or loops[0] < 1:
        raise ValueError(f"loop counts must be whole numbers >= 1, got {loops}")
    if exit_rules and not is_looped(model):
        raise ValueError(f"adaptive exit needs a LoopUS model, got a plain {type(model).__name__}")
    if len({r.num_loops for r in exit_rules}) > 1:
        raise ValueError("every exit rule of one call must have the same budget (num_loops)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    start = sequence_start(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=len(items), desc=desc, unit="item", disable=not progress, dynamic_ncols=True)
    for first in range(0, len(items), batch_size):
        chunk = items[first : first + batch_size]
        encoded = [encode_item(tokenizer, item, start) for item in chunk]
        fast = [shared_prefix and e.shares_prefix for e in encoded]
        fixed: list[dict[int, list[float]] | None] = [None] * len(chunk)
        for path, flag in ((_fixed_shared, True), (_fixed_per_option, False)):
            picked = [i for i, f in enumerate(fast) if f == flag]
            if picked:
                for i, scores in zip(picked, path(model, [encoded[i] for i in picked], loops, pad_id)):
                    fixed[i] = scores
        for item, e, scores in zip(chunk, encoded, fixed):
            record = {"id": item.id, "depth": item.depth, "gold": item.gold,
                      "fixed": {str(n): _result(v, item.gold) for n, v in scores.items()}, "exit": {}}
            if exit_rules:
                for label, (loglik, passes) in _exit_scores(model, e, exit_rules).items():
                    record["exit"][label] = {**_result(loglik, item.gold), "loop_passes": passes}
            yield record
        bar.update(len(chunk))
    bar.close()
