"""`loopus serve`: the OpenAI-compatible server, driven by the official `openai` client on 127.0.0.1.

Greedy replies (whole and streamed) equal `model.generate` token for token, with the loop passes the
cache recorded; concurrent clients get their own answers; bad requests get a 4xx and the server goes
on; the server and the CLI shut down cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from conftest import char_tokenizer, tiny_base, tiny_looped

import loopus
from loopus.compat import output_cache
from loopus.serving.app import build_app, serving
from loopus.serving.engine import Engine

SETTINGS = [
    {},  # the model's budget, every token runs it
    {"num_loops": 2},
    {"num_loops": 3, "exit_strategy": "convergence", "exit_threshold": 0.5},
]


def reference(model, tokenizer, ids: list[int], max_tokens: int, **loop) -> tuple[str, list[int], list[int]]:
    """Text, tokens and per-token loop passes of a greedy `model.generate` (passes: the forward that chose each)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             return_dict_in_generate=True, **loop)
    tokens = out.sequences[0, len(ids):].tolist()
    passes = output_cache(out).loop_passes[0, len(ids) - 1:].tolist() if isinstance(model, loopus.LoopUSForCausalLM) \
        else []
    return tokenizer.decode(tokens, skip_special_tokens=True), tokens, passes


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_looped("llama", num_loops=3), char_tokenizer()
    engine = Engine(model, tokenizer, "tiny", loop_limit=16)
    with serving(build_app(engine, default_max_tokens=16)) as url:
        yield model, tokenizer, openai.OpenAI(base_url=url, api_key="unused", max_retries=0), url


@pytest.mark.parametrize("loop", SETTINGS)
def test_completion_equals_generate(tiny, loop):
    model, tokenizer, client, _ = tiny
    text, tokens, passes = reference(model, tokenizer, tokenizer("The sea")["input_ids"], 12, **loop)
    reply = client.completions.create(model="tiny", prompt="The sea", max_tokens=12, temperature=0, extra_body=loop)
    choice = reply.choices[0]
    assert choice.text == text
    assert choice.loop_passes == passes
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == len(tokens) == 12
    assert reply.usage.mean_loop_passes == sum(passes) / len(passes)
    if loop.get("exit_strategy"):
        assert min(passes) < loop["num_loops"]  # the rule fired: fewer passes than the budget for some tokens


@pytest.mark.parametrize("loop", SETTINGS)
def test_streamed_completion_and_chat_equal_generate(tiny, loop):
    model, tokenizer, client, _ = tiny
    text, tokens, passes = reference(model, tokenizer, tokenizer("Hi")["input_ids"], 10, **loop)
    chunks = list(client.completions.create(model="tiny", prompt="Hi", max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=loop))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [p for c in chunks if c.choices for p in getattr(c.choices[0], "loop_passes", [])] == passes
    assert chunks[-1].usage.completion_tokens == len(tokens)
    assert chunks[-1].usage.mean_loop_passes == sum(passes) / len(passes)

    # no chat template: the messages are continued as plain text, here the one user message "Hi"
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=10, temperature=0, stream=True, extra_body=loop))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert [p for c in chunks for p in getattr(c.choices[0], "loop_passes", [])] == passes
    assert chunks[-1].choices[0].finish_reason == "length"
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=10, temperature=0, extra_body=loop)
    assert whole.choices[0].message.content == text
    assert whole.usage.mean_loop_passes == sum(passes) / len(passes)


def test_chat_template_is_applied():
    model, tokenizer = tiny_looped("llama", num_loops=2), char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}a:"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "Go"}]
    ids = tokenizer("u:Hi\na:Yo\nu:Go\na:", add_special_tokens=False)["input_ids"]
    text, _, passes = reference(model, tokenizer, ids, 8)
    with serving(build_app(Engine(model, tokenizer, "tiny"))) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].loop_passes == passes


def test_concurrent_clients_get_their_own_answers(tiny):
    model, tokenizer, client, _ = tiny
    jobs = [(f"Prompt {i}{'!' * i}", {"num_loops": 1 + i % 3}) for i in range(8)]
    expected = [reference(model, tokenizer, tokenizer(p)["input_ids"], 10, **loop)[0] for p, loop in jobs]

    def ask(job):
        prompt, loop = job
        if len(prompt) % 2:  # half of them streamed
            stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                               stream=True, extra_body=loop)
            return "".join(c.choices[0].text for c in stream if c.choices)
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                         extra_body=loop).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, jobs)) == expected


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


BAD = [
    ("completions", b'{"model": "tiny", "prompt": "Hi", ', 400, "not valid JSON"),
    ("completions", b'["not", "an", "object"]', 400, "invalid request"),
    ("completions", {"model": "other", "prompt": "Hi"}, 404, "not served here"),
    ("completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 0}, 400, "max_tokens must be >= 1"),
    ("completions", {"model": "tiny", "prompt": "Hi", "max_tokens": -5}, 400, "max_tokens must be >= 1"),
    ("completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 500}, 400, "over the context length of 128"),
    ("completions", {"model": "tiny", "prompt": "Hi", "num_loops": 0}, 400, "num_loops must be >= 1"),
    ("completions", {"model": "tiny", "prompt": "Hi", "num_loops": 2.5}, 400, "num_loops"),
    ("completions", {"model": "tiny", "prompt": "Hi", "num_loops": 1000}, 400, "over this server's limit"),
    ("completions", {"model": "tiny", "prompt": "Hi", "exit_strategy": "guess"}, 400, "unknown exit_strategy"),
    ("completions", {"model": "tiny", "prompt": "Hi", "exit_threshold": 0.5}, 400, "without an exit_strategy"),
    ("completions", {"model": "tiny", "prompt": "x" * 200}, 400, "over the context length of 128"),
    ("completions", {"model": "tiny", "prompt": [5, 97]}, 400, "prompt token ids must be in 0..96"),
    ("completions", {"model": "tiny", "prompt": ["Hi", "Yo"]}, 400, "one prompt per request"),
    ("completions", {"model": "tiny", "prompt": "Hi", "stop": ["."]}, 400, "'stop' is not supported"),
    ("completions", {"model": "tiny", "prompt": "Hi", "n": 2}, 400, "one choice per request"),
    ("chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, 400,
     "max_tokens must be >= 1"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 200}]}, 400,
     "over the context length"),
]


@pytest.mark.parametrize("endpoint, body, status, message", BAD, ids=[b[3] for b in BAD])
def test_bad_request_gets_4xx_and_the_server_goes_on(tiny, endpoint, body, status, message):
    model, tokenizer, client, url = tiny
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    code, answer = post(f"{url}/{endpoint}", raw)
    assert code == status
    assert message in answer["error"]["message"]
    reply = client.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0)
    assert reply.choices[0].text == reference(model, tokenizer, tokenizer("Hi")["input_ids"], 4)[0]


def test_openai_client_raises_on_bad_requests(tiny):
    _, _, client, _ = tiny
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="other", prompt="Hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="num_loops must be >= 1"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"num_loops": 0})
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_unlooped_base_is_served_and_refuses_loop_fields():
    model, tokenizer = tiny_base("llama"), char_tokenizer()
    model.generation_config.eos_token_id = None
    text, _, _ = reference(model, tokenizer, tokenizer("Hi")["input_ids"], 6)
    with serving(build_app(Engine(model, tokenizer, "base"))) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        reply = client.completions.create(model="base", prompt="Hi", max_tokens=6, temperature=0)
        assert reply.choices[0].text == text
        assert getattr(reply.usage, "mean_loop_passes", None) is None
        with pytest.raises(openai.BadRequestError, match="not a looped model"):
            client.completions.create(model="base", prompt="Hi", max_tokens=6, extra_body={"num_loops": 2})


def test_server_shuts_down_cleanly():
    engine = Engine(tiny_looped("llama", num_loops=2), char_tokenizer(), "tiny")
    with serving(build_app(engine)) as url:
        assert openai.OpenAI(base_url=url, api_key="unused").completions.create(
            model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(urllib.error.URLError):  # nothing listens any more
        urllib.request.urlopen(f"{url}/models", timeout=5)


def test_cli_serves_a_checkpoint_and_stops_on_ctrl_c(tmp_path):
    model, tokenizer = tiny_looped("llama", num_loops=3), char_tokenizer()
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(loopus.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "loopus.cli", "serve", str(tmp_path / "ckpt"), "--port", "0",
                             "--num-loops", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "at http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        reply = openai.OpenAI(base_url=url, api_key="unused").completions.create(
            model="ckpt", prompt="Hi", max_tokens=5, temperature=0)
        text, _, passes = reference(model, tokenizer, tokenizer("Hi")["input_ids"], 5, num_loops=2)
        assert reply.choices[0].text == text
        assert reply.usage.mean_loop_passes == 2.0 == sum(passes) / len(passes)  # the server-wide default
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_a_busy_port(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "loopus.cli", "serve", str(tmp_path), "--port", str(port)],
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": str(Path(loopus.__file__).parents[1])})
    assert result.returncode == 2
    assert f"loopus serve: error: cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.mark.real
def test_real_gemma_served_equals_generate(gemma):
    base, tokenizer = gemma
    model = loopus.convert(base, 6, 3, num_loops=4).eval()
    prompt = "The capital of France is"
    loop = {"num_loops": 4, "exit_strategy": "convergence", "exit_threshold": 0.05}
    text, tokens, passes = reference(model, tokenizer, tokenizer(prompt)["input_ids"], 12, **loop)
    with serving(build_app(Engine(model, tokenizer, "gemma-3-270m"))) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        whole = client.completions.create(model="gemma-3-270m", prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body=loop)
        chunks = list(client.completions.create(model="gemma-3-270m", prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body=loop))
    assert whole.choices[0].text == text
    assert whole.choices[0].loop_passes == passes
    assert whole.usage.completion_tokens == len(tokens)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.mean_loop_passes == whole.usage.mean_loop_passes == sum(passes) / len(passes)


def test_streamed_pieces_add_up_to_the_whole_decode_across_line_breaks():
    """A SentencePiece-style decoder drops the leading space of a sequence's first token, so the streamer
    must not decode the token after a line break on its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from loopus.serving.engine import DepthStreamer

    vocab = {"<unk>": 0, "▁Hello": 1, "\n": 2, "▁The": 3, "▁end": 4, "!": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokens = [1, 2, 3, 4, 2, 2, 3, 5]
    streamer = DepthStreamer(tokenizer, cache=None)
    streamer.put(torch.tensor([[1]]))  # the prompt
    for token in tokens:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(piece.text for piece in streamer) == tokenizer.decode(tokens) == "Hello\n The end\n\n The!"


def test_a_stopped_generation_ends_early_and_a_queued_one_never_starts():
    engine = Engine(tiny_looped("llama", num_loops=2), char_tokenizer(), "tiny")
    ids = engine.text_ids("Hi")
    running = engine.start(ids, 100)
    next(running)  # it has started
    running.stop()
    assert 1 <= len(running.collect().tokens) < 100
    assert running.finish_reason == "stop"
    with engine.lock:  # another generation holds the model: this one waits its turn
        queued = engine.start(ids, 100)
        queued.stop()
    assert queued.collect().tokens == []


def test_sampling_with_a_seed_is_repeatable(tiny):
    model, tokenizer, client, _ = tiny
    ids = tokenizer("Hi")["input_ids"]
    torch.manual_seed(7)
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9)
    replies = [client.completions.create(model="tiny", prompt="Hi", max_tokens=12, temperature=1.5, top_p=0.9, seed=7)
               for _ in range(2)]
    assert replies[0].choices[0].text == replies[1].choices[0].text == tokenizer.decode(expected[0, len(ids):])
