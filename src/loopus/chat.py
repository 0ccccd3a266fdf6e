"""The `loopus chat` session: a read-reply loop that streams each token marked with the loop passes it used.

Depth is shown as a colour from green (one pass) to red (the whole budget), or, without colour, as a
superscript number after the token. After every reply a status line gives the mean passes per token,
tokens per second and the KV cache's size. Ctrl-C stops the reply being generated (what was said so
far stays in the conversation); Ctrl-D or /quit leaves.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from .serving.engine import Engine, Generation, LoopSettings

SCALE = (46, 118, 226, 214, 208, 196)  # xterm-256 colours, green (1 pass) to red (the whole budget)
SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
HELP = """commands:
  /loops N                     loop budget: passes of the reasoning block per token
  /exit STRATEGY [THRESHOLD]   per-token early exit (threshold, cdf, convergence, kl); /exit none: every token
                               runs the whole budget
  /reset                       forget the conversation
  /save FILE                   write the conversation with every token's loop passes as JSON
  /help                        this list
  /quit                        leave (also Ctrl-D); Ctrl-C stops the reply being generated"""


def mark(text: str, passes: int | None, budget: int, color: bool) -> str:
    """`text` coloured by its depth on the scale of `budget`, or followed by a superscript pass count."""
    if passes is None or not text:
        return text
    if not color:  # the count goes before a line break, on the line of the text it belongs to
        body = text.rstrip("\n")
        return body + str(passes).translate(SUPERSCRIPT) + text[len(body):]
    step = 0 if budget <= 1 else round((passes - 1) * (len(SCALE) - 1) / (budget - 1))
    return f"\033[38;5;{SCALE[min(max(step, 0), len(SCALE) - 1)]}m{text}\033[0m"


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class ChatSession:
    """The conversation, its loop settings and the terminal it talks to."""

    def __init__(self, engine: Engine, settings: LoopSettings, max_new_tokens: int, temperature: float,
                 color: bool, out=None):
        engine.loop_kwargs(settings)  # refuse bad flags before the first prompt
        self.engine, self.settings = engine, settings
        self.max_new_tokens, self.temperature, self.color = max_new_tokens, temperature, color
        self.out = out or sys.stdout
        self.messages: list[dict] = []  # what the model sees
        self.turns: list[dict] = []  # what /save writes: the messages plus each reply's tokens and settings

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def describe(self) -> str:
        kwargs = self.engine.loop_kwargs(self.settings)
        rule = (f"exit {kwargs['exit_strategy']} at {kwargs['exit_threshold']:g}" if "exit_strategy" in kwargs
                else "no early exit")
        loops = kwargs["num_loops"]
        return f"budget {loops} loop{'' if loops == 1 else 's'}, {rule}"

    def legend(self) -> str:
        budget = self.engine.loop_kwargs(self.settings)["num_loops"]
        if not self.color:
            return "loop passes per token: superscript after each token"
        return "loop passes per token: " + " ".join(mark(str(n), n, budget, True) for n in range(1, budget + 1))

    def run(self, read=input) -> None:
        """The loop: read a line, run a command or reply to it, until Ctrl-D or /quit."""
        self.say(f"loopus chat: {self.engine.name} ({self.describe()}); /help lists the commands")
        if not self.engine.has_chat_template:
            self.say("note: this tokenizer has no chat template, so this is plain continuation: "
                     "the model continues the text so far")
        self.say(self.legend())
        while True:
            try:
                line = read("> ")
            except EOFError:
                self.say()
                return
            except KeyboardInterrupt:
                self.say("^C (Ctrl-D or /quit leaves)")
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line.split()):
                    return
                continue
            self.reply(line)

    def command(self, words: list[str]) -> bool:
        """Run one /command; False to leave."""
        name, rest = words[0], words[1:]
        try:
            if name == "/quit":
                return False
            if name == "/help":
                self.say(HELP)
            elif name == "/loops" and len(rest) == 1:
                self.change(replace(self.settings, num_loops=parse_int(rest[0], "/loops N")))
            elif name == "/exit" and len(rest) in (1, 2):
                threshold = float(rest[1]) if len(rest) == 2 else None
                self.change(replace(self.settings, exit_strategy=rest[0], exit_threshold=threshold))
            elif name == "/reset":
                self.messages.clear()
                self.turns.clear()
                self.say("conversation cleared")
            elif name == "/save" and len(rest) == 1:
                self.save(Path(rest[0]))
            else:
                self.say(f"unknown command or arguments: {' '.join(words)} (/help lists the commands)")
        except (ValueError, OSError) as err:
            self.say(f"error: {err}")
        return True

    def change(self, settings: LoopSettings) -> None:
        self.engine.loop_kwargs(settings)  # ValueError: the old settings stay
        self.settings = settings
        self.say(f"now: {self.describe()}")
        self.say(self.legend())

    def save(self, path: Path) -> None:
        record = {"model": self.engine.name, "chat_template": self.engine.has_chat_template, "turns": self.turns}
        path.write_text(json.dumps(record, indent=2, ensure_ascii=False))
        self.say(f"saved {len(self.turns)} messages to {path}")

    def reply(self, text: str) -> None:
        """Stream the model's reply to `text`; Ctrl-C ends it early and keeps what was said."""
        kwargs = self.engine.loop_kwargs(self.settings)
        budget = kwargs["num_loops"]
        self.messages.append({"role": "user", "content": text})
        try:
            gen = self.engine.start(self.engine.chat_ids(self.messages), self.max_new_tokens, self.settings,
                                    self.temperature or None)
        except ValueError as err:
            self.messages.pop()
            self.say(f"error: {err}")
            return
        self.turns.append({"role": "user", "content": text})
        stopped = self.stream(gen, budget)
        self.messages.append({"role": "assistant", "content": gen.text})
        self.turns.append({"role": "assistant", "content": gen.text, **kwargs, "stopped": stopped,
                           "mean_loop_passes": gen.mean_passes,
                           "tokens": [{"text": self.engine.tokenizer.decode([t]), "loop_passes": p}
                                      for t, p in zip(gen.tokens, gen.passes)]})
        self.say(self.status(gen, budget, stopped))

    def stream(self, gen: Generation, budget: int) -> bool:
        """Write the pieces as they come; True if Ctrl-C stopped the generation."""
        stopped = False
        while True:
            try:
                for piece in gen:
                    self.out.write(mark(piece.text, piece.passes, budget, self.color))
                    self.out.flush()
                break
            except KeyboardInterrupt:  # the worker ends after its current token; keep reading until it has
                gen.stop()
                stopped = True
        self.say(" [stopped]" if stopped else "")
        return stopped

    def status(self, gen: Generation, budget: int, stopped: bool) -> str:
        mean = "-" if gen.mean_passes is None else f"{gen.mean_passes:.2f}"
        kv = "" if gen.kv_bytes is None else f" | KV cache {human_bytes(gen.kv_bytes)}"
        line = (f"[{mean} passes/token of {budget} | {gen.tokens_per_second:.1f} tokens/s | {len(gen.tokens)} "
                f"tokens{kv}]")
        return f"\033[2m{line}\033[0m" if self.color else line


def parse_int(text: str, usage: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{usage}: {text!r} is not a whole number") from None
