"""The command line itself: one name per concept with the old spellings still working, help with defaults,
a fast `loopus --help`, and `--show-loops color` only on a terminal."""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loopus import deprecation
from loopus.cli import build_parser
from loopus.commands.generate import LoopStreamer, colour_legend

SRC = str(Path(__file__).resolve().parents[1] / "src")
MY_VERBS = ["analyze", "convert", "eval", "generate", "lm-eval", "trace"]


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser(argv).parse_known_args(argv)[0]


@pytest.mark.parametrize(
    "new, old",
    [
        (["generate", "m", "--num-loops", "3", "--exit-strategy", "kl", "--exit-threshold", "0.1"],
         ["generate", "m", "--max-loops", "3", "--strategy", "kl", "--threshold", "0.1"]),
        (["eval", "m", "--num-loops", "1,2", "--exit-strategy", "kl", "--exit-threshold", "0.1,0.2"],
         ["eval", "m", "--loops", "1,2", "--exit-strategy", "kl", "--thresholds", "0.1,0.2"]),
        (["run", "--num-loops", "1,2"], ["run", "--loops", "1,2"]),
    ],
)
def test_old_flag_spellings_still_work_and_warn_once(new, old, capsys, monkeypatch):
    monkeypatch.setattr(deprecation._OldFlag, "warned", set())
    assert vars(parse(old)) == vars(parse(new))
    parse(old)
    err = capsys.readouterr().err
    renamed = [a for a in old if a.startswith("--") and a not in new]
    for flag in renamed:
        assert err.count(f"loopus: warning: {flag} is deprecated") == 1
    parse(new)
    assert "deprecated" not in capsys.readouterr().err


@pytest.mark.parametrize("verb", MY_VERBS)
def test_every_flag_has_help_and_shows_its_default(verb):
    parser = build_parser([verb])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[verb]
    text = "".join(sub.format_help().split())  # without whitespace: long defaults wrap mid-word
    for action in sub._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{verb} {action.option_strings or action.dest} has no help"
        if action.option_strings and action.default not in (None, False):
            assert "default" in action.help or f"(default:{action.default})" in text, action.option_strings


def test_fixed_value_options_list_their_choices():
    sub = build_parser(["generate"])._subparsers._group_actions[0].choices["generate"]
    by_flag = {a.option_strings[0]: a for a in sub._actions if a.option_strings}
    assert list(by_flag["--exit-strategy"].choices) == ["none", "threshold", "cdf", "convergence", "kl"]
    assert list(by_flag["--kv-mode"].choices) == ["per_depth", "shared"]
    assert list(by_flag["--show-loops"].choices) == ["off", "number", "color"]


def test_help_does_not_import_torch():
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "loopus.cli", "--help"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "COMMAND" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
    assert not imported & {"torch", "transformers", "lm_eval", "accelerate"}


def test_verb_list_and_running_verbs_build_without_torch():
    """`loopus --help` and the parsers of generate, eval, lm-eval and trace build without torch (analyze
    and convert read their shown defaults from the config). `run` and `train` are stubbed here."""
    code = (
        "import sys, types\n"
        "for heavy in ('loopus.commands.run', 'loopus.commands.train'):\n"
        "    sys.modules[heavy] = types.SimpleNamespace(HELP='stub')\n"
        "from loopus.cli import build_parser\n"
        "for verb in (None, 'eval', 'generate', 'lm-eval', 'trace'):\n"
        "    build_parser([verb] if verb else ['--help'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'lm_eval', 'accelerate') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    # as `python -m loopus.cli` would start: `import loopus` then leaves the registration to the command
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.orig_argv[1:] = ['-m', 'loopus.cli']\n" + code],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip() == "[]"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_show_loops_color_only_on_a_terminal():
    piped = LoopStreamer(tokenizer=None, cache=None, show="color", out=io.StringIO())
    assert piped.show == "number"
    terminal = LoopStreamer(tokenizer=None, cache=None, show="color", out=_Terminal())
    assert terminal.show == "color"
    assert piped.passes == [] and piped.pieces.cache is None
    legend = colour_legend(6)
    assert "\033[32m1 green\033[0m" in legend and "\033[31m5+ red\033[0m" in legend
    assert "5+" not in colour_legend(3) and "3 blue" in colour_legend(3)


def test_generate_streamer_prints_each_token_with_its_loop_passes_and_the_whole_text():
    from types import SimpleNamespace

    import torch

    from conftest import char_tokenizer

    tokenizer = char_tokenizer()
    tokens = tokenizer("Hello\nworld", add_special_tokens=False)["input_ids"]
    cache = SimpleNamespace(loop_passes=torch.zeros(1, 0, dtype=torch.long))
    out = io.StringIO()
    streamer = LoopStreamer(tokenizer, cache, show="number", out=out)
    streamer.put(torch.tensor([[tokens[0]]]))  # the prompt comes first and is not printed
    passes = [1 + i % 3 for i in range(len(tokens))]
    for token, n in zip(tokens, passes):
        cache.loop_passes = torch.cat([cache.loop_passes, torch.tensor([[n]])], dim=1)
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert streamer.passes == passes
    printed = out.getvalue()
    assert printed.endswith("\n") and printed.count("[") == len(tokens)
    assert re.sub(r"\[\d+\]", "", printed) == tokenizer.decode(tokens, skip_special_tokens=True) + "\n"
    assert [int(n) for n in re.findall(r"\[(\d+)\]", printed)] == passes
