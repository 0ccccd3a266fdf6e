"""The OpenAI-compatible HTTP app of `loopus serve` (FastAPI; uvicorn runs it).

Endpoints: `/v1/chat/completions`, `/v1/completions` (each streamed as server-sent events or not),
`/v1/models` and `/health`. A refused request gets a 4xx with an OpenAI error body and changes
nothing; the server goes on serving. Generations run one at a time (`engine.Engine`), so concurrent
requests queue and are not batched.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from typing import AsyncIterator, Callable, Iterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types import Model
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from .engine import Engine, Generation
from .protocol import (
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    RequestError,
    chat_chunk,
    chat_completion,
    completion,
    new_id,
)


def build_app(engine: Engine, default_max_tokens: int = 256) -> FastAPI:
    """The app serving `engine`; `default_max_tokens` applies to requests without max_tokens (cut to the context)."""
    app = FastAPI(title="loopus serve", docs_url=None, redoc_url=None)
    started = int(time.time())

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(RequestError(400, validation_message(err)).body(), status_code=400)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        model = Model(id=engine.name, object="model", created=started, owned_by="loopus")
        return {"object": "list", "data": [model.model_dump()]}

    def begin(request: GenerationRequest, ids: Callable[[], list[int]]) -> Generation:
        """Refuse a bad request (RequestError), or start its generation."""
        if request.model != engine.name:
            raise RequestError(404, f"model {request.model!r} is not served here: this server serves {engine.name!r}",
                               "model")
        request.refuse_unsupported()
        try:
            prompt = ids()
            max_tokens = request.requested_tokens()
            if max_tokens is None:  # the server's default, cut to what the context leaves
                room = default_max_tokens if engine.context is None else engine.context - len(prompt)
                max_tokens = max(1, min(default_max_tokens, room))
            return engine.start(prompt, max_tokens, request.loop_settings(), request.temperature, request.top_p,
                                request.seed)
        except ValueError as err:
            raise RequestError(400, str(err)) from None

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest):
        gen = begin(request, lambda: engine.chat_ids([m.as_dict() for m in request.messages]))
        request_id = new_id("chatcmpl")
        if not request.stream:
            await finish(gen)
            return chat_completion(request_id, engine.name, gen).model_dump(exclude_none=True)

        def chunks(piece) -> list[BaseModel]:
            if piece is None:
                tail = [chat_chunk(request_id, engine.name, finish_reason=gen.finish_reason)]
                return tail + ([chat_chunk(request_id, engine.name, gen=gen)] if request.include_usage else [])
            return [chat_chunk(request_id, engine.name, content=piece.text, passes=passes_of(piece))]

        head = chat_chunk(request_id, engine.name, role="assistant", content="")
        return event_stream(gen, chunks, head)

    @app.post("/v1/completions")
    async def complete(request: CompletionRequest):
        gen = begin(request, lambda: completion_ids(engine, request.prompt))
        request_id = new_id("cmpl")
        if not request.stream:
            await finish(gen)
            whole = completion(request_id, engine.name, gen.text, gen.finish_reason, gen.passes, gen)
            return whole.model_dump(exclude_none=True)

        def chunks(piece) -> list[BaseModel]:
            if piece is None:
                tail = [completion(request_id, engine.name, "", gen.finish_reason)]
                return tail + ([completion(request_id, engine.name, None, gen=gen)] if request.include_usage else [])
            return [completion(request_id, engine.name, piece.text, passes=passes_of(piece))]

        return event_stream(gen, chunks)

    return app


def completion_ids(engine: Engine, prompt: str | list) -> list[int]:
    """One prompt: text, a list holding one text, or token ids."""
    if isinstance(prompt, str):
        return engine.text_ids(prompt)
    if prompt and all(isinstance(p, int) for p in prompt):
        vocab = engine.model.config.get_text_config().vocab_size
        if not all(0 <= p < vocab for p in prompt):
            raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
        return list(prompt)
    if len(prompt) != 1:
        raise ValueError(f"one prompt per request, got {len(prompt)}: send one request per prompt")
    return engine.text_ids(prompt[0])


def passes_of(piece) -> list[int]:
    return [piece.passes] if piece.passes is not None else []


async def finish(gen: Generation) -> None:
    """Wait for the whole generation without blocking the event loop; a failure is a 500."""
    try:
        await run_in_threadpool(gen.collect)
    except Exception as err:
        raise RequestError(500, f"generation failed: {err}") from None


def event_stream(gen: Generation, chunks: Callable, head: BaseModel | None = None) -> StreamingResponse:
    """Server-sent events: `head`, the chunks of every piece, the closing chunks (`chunks(None)`), `[DONE]`.

    A client that goes away stops the generation at the next token.
    """

    async def events() -> AsyncIterator[str]:
        pieces = iter(gen)
        try:
            if head is not None:
                yield sse(head)
            while True:
                try:
                    piece = await anyio.to_thread.run_sync(next, pieces, None, abandon_on_cancel=True)
                except Exception as err:
                    yield f"data: {json.dumps(RequestError(500, f'generation failed: {err}').body())}\n\n"
                    return
                for chunk in chunks(piece):
                    yield sse(chunk)
                if piece is None:
                    break
            yield "data: [DONE]\n\n"
        finally:
            gen.stop()

    return StreamingResponse(events(), media_type="text/event-stream")


def sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"


def validation_message(err: RequestValidationError) -> str:
    """One line from pydantic's errors: 'field: what is wrong; ...' (malformed JSON included)."""
    parts = []
    for error in err.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        if error.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})")
        else:
            parts.append(f"{where or 'body'}: {error.get('msg')}")
    return "invalid request: " + "; ".join(parts)


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread (port 0: any free one); yields the base URL (".../v1")
    and shuts the server down on exit. For tests and benchmarks; `loopus serve` runs uvicorn in the foreground."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
