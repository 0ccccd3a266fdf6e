"""`loopus`: the lm-evaluation-harness model for LoopUS checkpoints, a thin subclass of lm-eval's `hf` model.

Everything lm-eval's `HFLM` does (tokenisation, BOS handling, request sorting and batching, the
one-token-continuation cache, rolling windows, generation with stop sequences, chat templates,
caching) is inherited unchanged. What differs:

* model args `num_loops`, `exit_strategy`, `exit_threshold`, `min_loops` are passed to the model
  (invalid exit settings are refused when the model is built, not after every task is);
* `_loglikelihood_tokens` runs the model once per length-sorted batch, takes its final hidden states
  (`last_hidden_state`) and applies the (262k-wide for Gemma) lm_head only at the positions whose
  log-probabilities the continuation needs, in chunks, so scoring cost and memory do not grow with
  context length times vocabulary;
* `max_length` is read from the wrapped base model's config, exactly as `hf` reads it from the base
  checkpoint, so `loglikelihood_rolling` (inherited: lm-eval's disjoint-window protocol) cuts the
  same windows as `--model hf` does.

With `num_loops=1` a converted model computes exactly its base model, so every metric equals
`--model hf` on the base checkpoint (tests/test_eval_lm_eval.py checks this).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator, resolve_max_length
from lm_eval.models.utils_hf import pad_and_concat
from tqdm import tqdm

import loopus  # noqa: F401  (registers LoopUS with AutoConfig / AutoModelForCausalLM)

from ..config import check_num_loops
from ..modeling import LoopUSForCausalLM

log = logging.getLogger(__name__)

EXIT_ARGS = ("exit_strategy", "exit_threshold", "min_loops")
# Continuations up to this many tokens get full log-prob rows (needed by lm-eval's one-token cache);
# longer ones (rolling windows) are scored chunk by chunk without materialising (len, vocab).
_FULL_ROW_LIMIT = 256


class _LongRow:
    """Scores of a long continuation, computed chunk-wise: its own log-probs and greedy flags only."""

    def __init__(self, cont_toks: list[int], token_logprobs: torch.Tensor, greedy: bool):
        self.cont_toks = cont_toks
        self.token_logprobs = token_logprobs
        self.greedy = greedy


@register_model("loopus")
class LoopUSLM(HFLM):
    """lm-eval model for a LoopUS checkpoint directory (or a `LoopUSForCausalLM` instance).

    Model args (besides every `hf` model arg): `num_loops` (default: the checkpoint's config),
    `exit_strategy`, `exit_threshold`, `min_loops` (adaptive exit while scoring and generating),
    `lm_head_chunk` (positions per lm_head chunk, default 1024).
    """

    def __init__(
        self,
        pretrained: Any,
        num_loops: int | None = None,
        exit_strategy: str | None = None,
        exit_threshold: float | None = None,
        min_loops: int | None = None,
        lm_head_chunk: int = 1024,
        backend: str = "causal",
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(pretrained=pretrained, backend=backend, device=device, **kwargs)
        if not isinstance(self.model, LoopUSForCausalLM):
            raise ValueError(
                f"--model loopus needs a LoopUS checkpoint, got {type(self.model).__name__}: "
                "evaluate a base model with --model hf, or convert it first (loopus convert)"
            )
        self.lm_head_chunk = int(lm_head_chunk)
        self.reset(
            num_loops=self.model.config.num_loops if num_loops is None else num_loops,
            exit_strategy=exit_strategy,
            exit_threshold=None if exit_threshold is None else float(exit_threshold),
            min_loops=min_loops,
        )

    def reset(self, num_loops: int | str, **exit_kwargs: Any) -> None:
        """Start a new point of a sweep: the loop budget and exit settings (None values removed) for what
        follows, and a fresh count of loop passes. A two-token forward validates the exit settings now."""
        self.num_loops = check_num_loops(int(num_loops) if isinstance(num_loops, str) else num_loops)
        self.exit_kwargs = {k: v for k, v in exit_kwargs.items() if v is not None}
        unknown = sorted(set(self.exit_kwargs) - set(EXIT_ARGS))
        if unknown:
            raise ValueError(f"unknown exit settings {unknown}: the exit model args are {', '.join(EXIT_ARGS)}")
        if isinstance(self.exit_kwargs.get("min_loops"), str):  # lm-eval model args arrive as text
            self.exit_kwargs["min_loops"] = int(self.exit_kwargs["min_loops"])
        self.loop_passes = [0.0, 0]  # loop passes spent on scored tokens: (sum, count)
        if self.exit_kwargs:
            self._forward_hidden(torch.full((1, 2), self.prefix_token_id, dtype=torch.long, device=self.device))

    # -- facts read from the wrapped base model ---------------------------------------------------

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return resolve_max_length(self.model.config.base_config, self.tokenizer, default=self._DEFAULT_MAX_LENGTH)

    @property
    def mean_loop_passes(self) -> float | None:
        total, count = self.loop_passes
        return total / count if count else None

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info.update({"num_loops": self.num_loops, **self.exit_kwargs})
        return info

    # -- model calls ----------------------------------------------------------------------------

    def _scoring_exit_kwargs(self) -> dict[str, Any]:
        """Exit kwargs for a full-sequence (scoring) forward: adaptive exit there needs `prefill_exit=True`."""
        return {**self.exit_kwargs, "prefill_exit": True} if self.exit_kwargs else {}

    def _forward_hidden(self, inps: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        """Run the model with the lm_head on one position only; callers apply it where they need logits
        to the output's `last_hidden_state`."""
        with torch.no_grad(), torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            return self.model(
                inps,
                attention_mask=attention_mask,
                num_loops=self.num_loops,
                use_cache=False,
                logits_to_keep=1,
                **self._scoring_exit_kwargs(),
            )

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Full logits (used by lm-eval's batch-size detection and by anyone calling it directly)."""
        with torch.no_grad():
            return self.model(inps, num_loops=self.num_loops, use_cache=False, **self._scoring_exit_kwargs()).logits

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        generation_kwargs.setdefault("num_loops", self.num_loops)
        for key, value in self.exit_kwargs.items():
            generation_kwargs.setdefault(key, value)
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _count_loop_passes(self, out: Any, spans: list[tuple[int, int]]) -> None:
        """Accumulate the reasoning passes (the output's `loop_passes`) of each row's scored tokens."""
        for row, (start, stop) in enumerate(spans):
            self.loop_passes[0] += float(out.loop_passes[row, start:stop].float().sum())
            self.loop_passes[1] += stop - start

    @torch.no_grad()
    def _score_rows(self, hidden: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Log-probs (len, vocab) at `spans` of each row: one lm_head call over all selected positions."""
        picked = torch.cat([hidden[row, start:stop] for row, (start, stop) in enumerate(spans)], dim=0)
        pieces = []
        for i in range(0, picked.shape[0], self.lm_head_chunk):
            logits = self.model.lm_logits(picked[i : i + self.lm_head_chunk])
            pieces.append(F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype))
        logprobs = torch.cat(pieces, dim=0)
        return list(logprobs.split([stop - start for start, stop in spans], dim=0))

    @torch.no_grad()
    def _score_long_row(self, hidden_row: torch.Tensor, cont_toks: list[int]) -> _LongRow:
        """Log-probs of `cont_toks` and the greedy check, chunk by chunk (for long rolling windows)."""
        target = torch.tensor(cont_toks, dtype=torch.long, device=hidden_row.device)
        token_logprobs, greedy = [], True
        for i in range(0, hidden_row.shape[0], self.lm_head_chunk):
            logits = self.model.lm_logits(hidden_row[i : i + self.lm_head_chunk])
            logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            chunk_target = target[i : i + self.lm_head_chunk]
            token_logprobs.append(logprobs.gather(1, chunk_target.unsqueeze(-1)).squeeze(-1))
            greedy = greedy and bool((logprobs.argmax(dim=-1) == chunk_target).all())
        return _LongRow(cont_toks, torch.cat(token_logprobs), greedy)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """HFLM's request handling (same sort, batching, truncation and one-token cache), scoring only continuations."""
        res: list[tuple[float, bool]] = []

        def _collate(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        def _lookup_one_token_cont(req):
            return req[-2] + req[-1][:-1]

        re_ord = Collator(
            requests,
            sort_fn=_collate,
            group_by="contexts" if self.logits_cache else None,
            group_fn=_lookup_one_token_cont,
        )
        batch_size = self.batch_size if self.batch_size != "auto" else (override_bs or 0)
        if batch_size == 0:  # "auto" without an override: lm-eval's detection assumes a GPU; use a fixed size
            batch_size = 16
        pbar = tqdm(total=len(requests), disable=(disable_tqdm or self.rank != 0), desc="loopus loglikelihood")
        for chunk in re_ord.get_batched(n=batch_size, batch_fn=None):
            inps, spans, cont_toks_list = [], [], []
            for _, context_enc, continuation_enc in chunk:
                assert len(context_enc) > 0 and len(continuation_enc) > 0
                assert len(continuation_enc) <= self.max_length
                total_length = len(context_enc) + len(continuation_enc)
                if total_length > self.max_length + 1:
                    log.warning(
                        "context (%d) + continuation (%d) exceed max_length %d: truncating from the left",
                        len(context_enc), len(continuation_enc), self.max_length,
                    )
                inp = torch.tensor(
                    (context_enc + continuation_enc)[-(self.max_length + 1) :][:-1],
                    dtype=torch.long,
                    device=self.device,
                )
                inplen = inp.shape[0]
                inps.append(inp)
                spans.append((inplen - len(continuation_enc), inplen))
                cont_toks_list.append(continuation_enc)
            # Lengths first: pad_and_concat replaces the list's tensors with (1, width) ones in place.
            lengths = [inp.shape[0] for inp in inps]
            width = max(lengths)
            batched = pad_and_concat(width, inps, padding_side="right")
            mask = None
            if self.exit_kwargs and min(lengths) < width:  # right padding must not keep a sequence looping
                mask = torch.zeros_like(batched)
                for row, length in enumerate(lengths):
                    mask[row, :length] = 1
            out = self._forward_hidden(batched, mask)
            hidden = out.last_hidden_state
            self._count_loop_passes(out, spans)

            short = [i for i, (a, b) in enumerate(spans) if b - a <= _FULL_ROW_LIMIT]
            scored: dict[int, Any] = {}
            if short:
                rows = self._score_rows(hidden[short], [spans[i] for i in short])
                scored.update({i: r.unsqueeze(0) for i, r in zip(short, rows)})
            for i, (a, b) in enumerate(spans):
                if i not in scored:
                    scored[i] = self._score_long_row(hidden[i, a:b], cont_toks_list[i])

            for i, (request_str, ctx_tokens, _) in enumerate(chunk):
                logprobs = scored[i]
                for req_str, cont_toks, row in re_ord.get_cache(
                    req_str=request_str, cxt_toks=ctx_tokens, cont_toks=cont_toks_list[i], logits=logprobs
                ):
                    if isinstance(row, _LongRow):
                        if list(cont_toks) != list(row.cont_toks):
                            raise RuntimeError("a long continuation was shared between requests: unsupported")
                        answer = (float(row.token_logprobs.sum()), row.greedy)
                    else:
                        cont = torch.tensor(cont_toks, dtype=torch.long, device=row.device).unsqueeze(0)
                        tail = row[:, -cont.shape[1] :]
                        greedy = bool((tail.argmax(dim=-1) == cont).all())
                        answer = (float(tail.gather(2, cont.unsqueeze(-1)).sum()), greedy)
                    res.append(answer)
                    if req_str is not None:
                        self.cache_hook.add_partial("loglikelihood", req_str, answer)
                    pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)
