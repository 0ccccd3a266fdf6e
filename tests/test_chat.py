"""`loopus chat`: through a real pseudo-terminal (pexpect), and the session's pieces directly.

The tiny model has a character tokenizer, so a reply shown with superscript pass counts is exactly
each generated character followed by the passes of the forward that chose it.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
from pathlib import Path

import pexpect
import pytest
import torch
from conftest import char_tokenizer, tiny_base, tiny_looped

import loopus
from loopus.chat import SUPERSCRIPT, ChatSession, mark
from loopus.compat import output_cache
from loopus.serving.engine import Engine, LoopSettings

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def expected_reply(model, tokenizer, text: str, max_tokens: int, **loop) -> str:
    """What the chat shows without colour: each generated character, then its loop passes in superscript."""
    ids = tokenizer(text)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             return_dict_in_generate=True, **loop)
    tokens = out.sequences[0, len(ids):].tolist()
    passes = output_cache(out).loop_passes[0, len(ids) - 1:].tolist()
    shown = [(tokenizer.decode([t]), str(p).translate(SUPERSCRIPT)) for t, p in zip(tokens, passes)]
    return "".join(sup + "\n" if char == "\n" else char + sup for char, sup in shown)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LoopUS checkpoint with a long context, so a reply can run long enough to be interrupted."""
    model = loopus.convert(tiny_base("llama", max_position_embeddings=8192), 2, 1, num_loops=3, gate_init=0.5).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(model.gate.up.weight, std=0.3)
    model.generation_config.eos_token_id = None
    path = tmp_path_factory.mktemp("chat") / "ckpt"
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path, model


def spawn(path: Path, *flags: str) -> pexpect.spawn:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(loopus.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    # Ctrl-C must reach the chat as it does from a terminal: a test runner started in the background of a
    # non-interactive shell ignores SIGINT, and exec would hand that on to the child
    child = pexpect.spawn(sys.executable, ["-m", "loopus.cli", "chat", str(path), *flags], env=env,
                          encoding="utf-8", timeout=120, dimensions=(50, 400),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact("/help lists the commands")
    return child


def reply_of(child: pexpect.spawn) -> tuple[str, str]:
    """(the streamed reply, its status line) once the status line has come."""
    child.expect(r"\[([0-9.]+) passes/token of \d+ \| [0-9.]+ tokens/s \| \d+ tokens \| KV cache [0-9.]+ \w+\]")
    text = ANSI.sub("", child.before).replace("\r\n", "\n")
    return text.rsplit("\n", 2)[-2] if text.endswith("\n") else text, child.match.group(0)


def test_chat_streams_depths_changes_loops_and_survives_ctrl_c(checkpoint, tmp_path):
    path, model = checkpoint
    tokenizer = char_tokenizer()
    child = spawn(path, "--no-color", "--max-new-tokens", "12")
    child.expect_exact("plain continuation")  # the char tokenizer has no chat template
    child.expect_exact("> ")
    child.sendline("Hello")
    reply, status = reply_of(child)
    assert reply.endswith(expected_reply(model, tokenizer, "Hello", 12))
    assert "3.00 passes/token of 3" in status

    child.expect_exact("> ")
    child.sendline("/loops 2")
    child.expect_exact("now: budget 2 loops, no early exit")
    child.expect_exact("> ")
    child.sendline("/exit convergence 0.5")
    child.expect_exact("now: budget 2 loops, exit convergence at 0.5")
    child.expect_exact("> ")
    child.sendline("/loops 0")
    child.expect_exact("error: num_loops must be >= 1, got 0")
    child.expect_exact("> ")
    child.sendline("/reset")
    child.expect_exact("conversation cleared")
    child.expect_exact("> ")
    child.sendline("Sea")
    reply, _ = reply_of(child)
    assert reply.endswith(expected_reply(model, tokenizer, "Sea", 12, num_loops=2, exit_strategy="convergence",
                                         exit_threshold=0.5))

    child.expect_exact("> ")
    child.sendline(f"/save {tmp_path / 'chat.json'}")
    child.expect_exact("saved 2 messages")
    child.expect_exact("> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["chat_template"] is False
    turn = saved["turns"][1]
    assert turn["exit_strategy"] == "convergence" and turn["num_loops"] == 2 and turn["stopped"] is False
    assert [t["text"] + str(t["loop_passes"]).translate(SUPERSCRIPT) for t in turn["tokens"]] == \
        re.findall(r"[^⁰¹²³⁴⁵⁶⁷⁸⁹][⁰¹²³⁴⁵⁶⁷⁸⁹]+", reply.rsplit("\n", 1)[-1])[-12:]
    assert turn["mean_loop_passes"] == sum(t["loop_passes"] for t in turn["tokens"]) / 12


def test_ctrl_c_stops_the_reply_not_the_program(checkpoint, tmp_path):
    path, _ = checkpoint
    child = spawn(path, "--no-color", "--max-new-tokens", "4000", "--num-loops", "16")
    child.expect_exact("> ")
    child.sendline("A long story")
    child.expect("¹⁶")  # tokens are coming
    child.sendintr()
    child.expect_exact("[stopped]")
    reply_of(child)
    child.expect_exact("> ")
    child.sendintr()  # at the prompt: a hint, not the end
    child.expect_exact("Ctrl-D or /quit leaves")
    child.sendline(f"/save {tmp_path / 'chat.json'}")
    child.expect_exact("saved 2 messages")
    child.expect_exact("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    story = json.loads((tmp_path / "chat.json").read_text())["turns"][-1]
    assert story["stopped"] is True and story["num_loops"] == 16
    assert 0 < len(story["tokens"]) < 4000
    assert all(t["loop_passes"] == 16 for t in story["tokens"])
    assert story["content"] == "".join(t["text"] for t in story["tokens"])


def test_colour_scale_and_superscripts():
    assert mark("a", 12, 16, color=False) == "a¹²"
    assert mark(".\n\n", 3, 4, color=False) == ".³\n\n"  # before the line break, on the token's line
    assert mark("a", 1, 4, color=True) == "\033[38;5;46ma\033[0m"  # one pass: green
    assert mark("a", 4, 4, color=True) == "\033[38;5;196ma\033[0m"  # the whole budget: red
    assert mark("", 3, 4, color=True) == ""


def test_session_uses_the_chat_template_and_refuses_bad_flags():
    model, tokenizer = tiny_looped("llama", num_loops=2), char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}a:"
    engine = Engine(model, tokenizer, "tiny")
    with pytest.raises(ValueError, match="unknown exit_strategy"):
        ChatSession(engine, LoopSettings(exit_strategy="soon"), 8, 0.0, color=False)
    out = io.StringIO()
    session = ChatSession(engine, LoopSettings(), 8, 0.0, color=True, out=out)
    session.run(_lines(["Hi", "/bogus"]))
    shown = out.getvalue()
    assert "plain continuation" not in shown
    assert "unknown command" in shown
    ids = tokenizer("u:Hi\na:", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        tokens = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
    assert session.messages[-1] == {"role": "assistant", "content": tokenizer.decode(tokens)}
    assert "\033[38;5;196m" in shown  # two of two passes, coloured red


def _lines(lines: list[str]):
    """An `input` stand-in: the lines, then end of input (Ctrl-D)."""
    pending = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(pending)
        except StopIteration:
            raise EOFError from None

    return read


@pytest.mark.parametrize("flags, message", [
    (["--exit-strategy", "soon"], "unknown exit_strategy 'soon'"),
    (["--num-loops", "0"], "num_loops must be >= 1, got 0"),
    (["--exit-threshold", "0.5"], "exit_threshold was given without an exit_strategy"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_cli_refuses_bad_flags_before_loading(tmp_path, flags, message):
    import subprocess

    result = subprocess.run([sys.executable, "-m", "loopus.cli", "chat", str(tmp_path / "missing"), *flags],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(loopus.__file__).parents[1])})
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("loopus chat: error: ") and message in last
