"""One model behind `loopus chat` and `loopus serve`: prompts in, tokens out with the loop passes each used.

Generation is `model.generate` (GenerationMixin) in a worker thread, streamed through a
`TextIteratorStreamer` subclass that reads, for every token `generate` hands it, the loop passes of
the forward that chose it from the KV cache (`LoopKVCache.loop_passes`). One generation runs at a
time (a lock): requests that arrive together wait their turn and are not batched, because every
request may ask for its own loop budget and exit rule, and one call of `generate` takes one of each.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer, set_seed

from ..cache import LoopKVCache
from ..compat import GENERATION_CACHE_KWARG
from ..config import check_num_loops
from ..halting import ExitRule
from ..modeling import LoopUSForCausalLM


@dataclass(frozen=True)
class LoopSettings:
    """Loop budget and exit rule of a request; None fields fall back to the server's (then the model's) defaults."""

    num_loops: int | None = None
    exit_strategy: str | None = None  # "none" turns a default exit rule off
    exit_threshold: float | None = None

    def given(self) -> bool:
        return any(v is not None for v in (self.num_loops, self.exit_strategy, self.exit_threshold))


class Piece(NamedTuple):
    """Text that became printable with one generated token, the token and the loop passes that chose it.

    A token that completes no character yet (part of a UTF-8 sequence) gives an empty text; the text
    left over when generation ends comes as a last piece with no token.
    """

    text: str
    token: int | None
    passes: int | None


class DepthStreamer(TextIteratorStreamer):
    """A `TextIteratorStreamer` that yields one `Piece` per generated token instead of whole words.

    Pieces go onto the queue the caller iterates, or, with `on_piece`, to that function as they come
    (`loopus generate` prints them).
    """

    def __init__(self, tokenizer, cache: LoopKVCache | None, on_piece: Callable[[Piece], None] | None = None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.cache = cache
        self.ended = False
        self.emit = on_piece or self.text_queue.put

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("streaming supports one sequence at a time")
        if self.next_tokens_are_prompt:  # generate hands over the prompt first
            self.next_tokens_are_prompt = False
            return
        token = int(value.reshape(-1)[0])
        # the cache's newest column is the forward that just chose `token`
        passes = int(self.cache.loop_passes[0, -1]) if self.cache is not None else None
        self.token_cache.append(token)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        piece = "" if text.endswith("\ufffd") else text[self.print_len :]
        self.print_len += len(piece)
        if text.endswith("\n"):  # start over, keeping the last token as context for a leading space after it
            self.token_cache = self.token_cache[-1:]
            self.print_len = len(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))
        self.emit(Piece(piece, token, passes))

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.token_cache:
            rest = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)[self.print_len :]
            if rest:
                self.emit(Piece(rest, None, None))
        self.text_queue.put(self.stop_signal)


class StopOnEvent(StoppingCriteria):
    """Ends `generate` at the next token once the event is set (Ctrl-C in chat, a client gone in serve)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Generation:
    """One `generate` call running in its worker thread. Iterate it for `Piece`s; the totals are read after."""

    def __init__(self, engine: "Engine", ids: list[int], max_new_tokens: int, generate_kwargs: dict,
                 seed: int | None):
        self.prompt_tokens = len(ids)
        self.max_new_tokens = max_new_tokens
        self.cache = engine.model.new_cache(generate_kwargs["num_loops"]) if engine.looped else None
        self.streamer = DepthStreamer(engine.tokenizer, self.cache)
        self.stop_event = threading.Event()
        self.tokens: list[int] = []
        self.passes: list[int] = []
        self.error: BaseException | None = None
        self.started = time.perf_counter()
        self.finished: float | None = None
        input_ids = torch.tensor([ids], dtype=torch.long, device=engine.model.device)
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                      streamer=self.streamer, stopping_criteria=StoppingCriteriaList([StopOnEvent(self.stop_event)]),
                      pad_token_id=engine.pad_token_id, **generate_kwargs)
        if self.cache is not None:
            kwargs[GENERATION_CACHE_KWARG] = self.cache
        self.thread = threading.Thread(target=self._run, args=(engine, kwargs, seed), daemon=True)
        self.thread.start()

    def _run(self, engine: "Engine", kwargs: dict, seed: int | None) -> None:
        try:
            with engine.lock, torch.no_grad():
                if self.stop_event.is_set():  # stopped while waiting for its turn: nothing to generate
                    return
                if seed is not None:
                    set_seed(seed)
                engine.model.generate(**kwargs)
        except BaseException as err:  # handed to the consumer, which raises it
            self.error = err
        finally:
            self.streamer.end()

    def __iter__(self) -> Iterator[Piece]:
        return self

    def __next__(self) -> Piece:
        """The next piece. An iterator, not a generator: a KeyboardInterrupt while waiting leaves it usable."""
        if self.finished is not None:
            raise StopIteration
        try:
            piece = next(self.streamer)
        except StopIteration:
            self.thread.join()
            self.finished = time.perf_counter()
            if self.error is not None:
                raise self.error from None
            raise
        if piece.token is not None:
            self.tokens.append(piece.token)
            if piece.passes is not None:
                self.passes.append(piece.passes)
        return piece

    def stop(self) -> None:
        """Ask the worker to end after the current token."""
        self.stop_event.set()

    def collect(self) -> "Generation":
        for _ in self:
            pass
        return self

    @property
    def text(self) -> str:
        """The whole reply, decoded at once (the streamed pieces add up to it)."""
        return self.streamer.tokenizer.decode(self.tokens, **self.streamer.decode_kwargs)

    @property
    def mean_passes(self) -> float | None:
        return sum(self.passes) / len(self.passes) if self.passes else None

    @property
    def finish_reason(self) -> str:
        return "length" if len(self.tokens) >= self.max_new_tokens else "stop"

    @property
    def kv_bytes(self) -> int | None:
        return self.cache.kv_bytes() if self.cache is not None else None

    @property
    def tokens_per_second(self) -> float:
        seconds = (self.finished or time.perf_counter()) - self.started
        return len(self.tokens) / seconds if seconds > 0 else 0.0


class Engine:
    """A model and its tokenizer, ready to generate for chat turns and HTTP requests."""

    def __init__(self, model, tokenizer, name: str, defaults: LoopSettings = LoopSettings(),
                 loop_limit: int | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.looped = isinstance(model, LoopUSForCausalLM)
        self.loop_limit = loop_limit
        self.context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.lock = threading.Lock()
        self.defaults = LoopSettings()
        self.loop_kwargs(defaults)  # refuse bad server-wide defaults at start-up
        self.defaults = defaults

    @property
    def has_chat_template(self) -> bool:
        return getattr(self.tokenizer, "chat_template", None) is not None

    def loop_kwargs(self, request: LoopSettings) -> dict:
        """`generate` keywords for a request's loop settings over the defaults; ValueError names what is wrong."""
        if not self.looped:
            if request.given():
                raise ValueError(f"{self.name} is not a looped model: num_loops, exit_strategy and exit_threshold "
                                 "do not apply to it")
            return {}
        num_loops = request.num_loops if request.num_loops is not None else self.defaults.num_loops
        num_loops = self.model.config.num_loops if num_loops is None else check_num_loops(num_loops)
        if self.loop_limit is not None and num_loops > self.loop_limit:
            raise ValueError(f"num_loops={num_loops} is over this server's limit of {self.loop_limit} "
                             "(loopus serve --loop-limit)")
        if request.exit_strategy is not None:
            strategy, threshold = request.exit_strategy, request.exit_threshold
        else:
            strategy = self.defaults.exit_strategy
            threshold = request.exit_threshold if request.exit_threshold is not None else self.defaults.exit_threshold
        rule = ExitRule.build(strategy, threshold, None, num_loops)
        if rule is None:
            return {"num_loops": num_loops}
        return {"num_loops": num_loops, "exit_strategy": rule.strategy, "exit_threshold": rule.threshold}

    def text_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The chat template's prompt where the tokenizer has one, else the plain transcript (`plain_transcript`)."""
        if self.has_chat_template:
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)
            return list(encoded["input_ids"])
        return self.text_ids(plain_transcript(messages))

    def check_lengths(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_new_tokens}")
        if self.context is None:
            return
        if prompt_tokens >= self.context:
            raise ValueError(f"the prompt has {prompt_tokens} tokens: over the context length of {self.context} "
                             "(the prompt and at least one new token must fit)")
        if prompt_tokens + max_new_tokens > self.context:
            raise ValueError(f"max_tokens={max_new_tokens} plus the prompt's {prompt_tokens} tokens is over the "
                             f"context length of {self.context}: ask for at most {self.context - prompt_tokens}")

    def start(self, ids: list[int], max_new_tokens: int, loop: LoopSettings = LoopSettings(),
              temperature: float | None = None, top_p: float | None = None, seed: int | None = None) -> Generation:
        """Check everything, then start generating in the worker thread (greedy unless temperature > 0)."""
        self.check_lengths(len(ids), max_new_tokens)
        kwargs = self.loop_kwargs(loop) | sampling_kwargs(temperature, top_p)
        return Generation(self, ids, max_new_tokens, kwargs, seed)


def sampling_kwargs(temperature: float | None, top_p: float | None) -> dict:
    """Greedy for temperature None or 0 (top_p must then be left out or 1), sampling above."""
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not temperature:
        if top_p is not None and top_p != 1:
            raise ValueError("top_p applies to sampling: give a temperature > 0 with it")
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), "top_p": 1.0 if top_p is None else float(top_p)}


def plain_transcript(messages: list[dict]) -> str:
    """The text a model without a chat template continues: the messages' texts in order, each message
    after a reply on a new line, so the model's reply continues the user's text directly."""
    text = ""
    for message in messages:
        if message["role"] != "assistant" and text and not text[-1].isspace():
            text += "\n"
        text += message["content"]
    return text
