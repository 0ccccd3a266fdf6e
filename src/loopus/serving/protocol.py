"""What `loopus serve` reads and writes: request bodies (pydantic) and responses (the `openai` package's types).

Requests are the OpenAI chat-completions and completions bodies, plus three extension fields:
`num_loops` (loop budget), `exit_strategy` ("none", threshold, cdf, convergence, kl) and
`exit_threshold`. Responses are `openai.types` objects with two extension fields: `usage` carries
`mean_loop_passes` (mean reasoning passes per generated token) and each choice carries
`loop_passes` (the passes of each of its tokens; in a stream, of the chunk's tokens).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .engine import Generation, LoopSettings

# Fields of the OpenAI bodies that change what a reply means and that this server does not implement:
# refused with a 400 rather than silently ignored (a neutral value such as a penalty of 0 passes).
UNSUPPORTED = ("stop", "logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
               "response_format", "logit_bias", "presence_penalty", "frequency_penalty", "best_of", "echo",
               "suffix", "prediction", "audio", "modalities")


class RequestError(Exception):
    """A request refused with an HTTP status and a message (the OpenAI error body)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": None}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: StrictInt | None = None
    n: StrictInt | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    num_loops: StrictInt | None = None
    exit_strategy: str | None = None
    exit_threshold: float | None = None

    def loop_settings(self) -> LoopSettings:
        return LoopSettings(self.num_loops, self.exit_strategy, self.exit_threshold)

    def refuse_unsupported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in (None, 0, False, [], {}):
                raise RequestError(400, f"{name!r} is not supported by loopus serve: leave it out", name)
        if self.n not in (None, 1):
            raise RequestError(400, f"n={self.n}: loopus serve returns one choice per request (n=1)", "n")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[StrictInt]

    def requested_tokens(self) -> int | None:
        return self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(gen: Generation) -> CompletionUsage:
    """Token counts, and the mean loop passes per generated token (absent for a model that does not loop)."""
    fields = dict(prompt_tokens=gen.prompt_tokens, completion_tokens=len(gen.tokens),
                  total_tokens=gen.prompt_tokens + len(gen.tokens))
    if gen.mean_passes is not None:
        fields["mean_loop_passes"] = gen.mean_passes
    return CompletionUsage.model_validate(fields)


def passes_field(passes: list[int]) -> dict:
    return {"loop_passes": passes} if passes else {}


def chat_completion(request_id: str, model: str, gen: Generation) -> ChatCompletion:
    message = ChatCompletionMessage(role="assistant", content=gen.text)
    choice = Choice.model_validate(dict(index=0, message=message, finish_reason=gen.finish_reason,
                                        **passes_field(gen.passes)))
    return ChatCompletion(id=request_id, object="chat.completion", created=int(time.time()), model=model,
                          choices=[choice], usage=usage(gen))


def chat_chunk(request_id: str, model: str, content: str | None = None, passes: list[int] | None = None,
               role: str | None = None, finish_reason: str | None = None,
               gen: Generation | None = None) -> ChatCompletionChunk:
    """One streamed chunk: a delta, or (with `gen`) the closing usage chunk that has no choices."""
    choices = []
    if gen is None:
        delta = ChoiceDelta(role=role, content=content)
        choices = [ChunkChoice.model_validate(dict(index=0, delta=delta, finish_reason=finish_reason,
                                                   **passes_field(passes or [])))]
    return ChatCompletionChunk(id=request_id, object="chat.completion.chunk", created=int(time.time()),
                               model=model, choices=choices, usage=usage(gen) if gen is not None else None)


def completion(request_id: str, model: str, text: str | None, finish_reason: str | None = None,
               passes: list[int] | None = None, gen: Generation | None = None) -> Completion:
    """A text completion: whole or one streamed piece (`text`), with the usage of `gen` if given; the closing
    usage chunk of a stream has no `text` and no choices."""
    choices = []
    if text is not None:
        # built unvalidated: a streamed piece has no finish_reason yet, which the type does not allow
        choices = [CompletionChoice.model_construct(index=0, text=text, finish_reason=finish_reason, logprobs=None,
                                                    **passes_field(passes or []))]
    return Completion(id=request_id, object="text_completion", created=int(time.time()), model=model,
                      choices=choices, usage=usage(gen) if gen is not None else None)
