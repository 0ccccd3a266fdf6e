"""Supervised fine-tuning data: TRL's dataset formats, tokenised so that only the answers are labels.

Formats, detected from the fields of a JSONL corpus's first record (TRL's names):

- prompt/completion: `{"prompt": str, "completion": str}`; or conversational, both lists of messages;
- conversational:    `{"messages": [{"role": ..., "content": ...}, ...]}`, every assistant message supervised;
- anything else (`{"text": ...}`) is plain language modelling (`data.Packer`), not this module.

Tokens. An example starts the way the tokenizer starts a sequence (Gemma, Llama: its BOS; Qwen:
nothing). Prompt and completion are tokenised apart, the prompt exactly as a generation from it sees
it, and EOS ends the completion. Conversations go through the chat template (the tokenizer's, or a
Jinja file, `--chat-template`); an assistant message's tokens are the text the template adds between
the conversation before it with the generation prompt and the conversation through it, so its
end-of-turn marker is supervised too and the model learns to stop.

Labels. Prompt tokens are stored as input only (`sources.INPUT_ONLY`): every loss term (LM, monotonicity,
confidence) and validation skip them, so the chunked cross entropy computes the vocabulary head only
at answer positions.

Rows. One example per row, right-padded: causal attention never lets a token see the padding after
it, so a padded row computes exactly what the example alone computes (several examples per row would
need block-diagonal attention, which the looped model's pieces do not take). An example longer than
the row is refused with its line, or with `long_examples="truncate_prompt"` loses prompt tokens from
the left, after its start; the count goes into the data report, which the trainer prints and logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import LoopUSError
from ..text import read_jsonl_records
from .sources import INPUT_ONLY, PAD_SLOT, Source, held_out

LONG_EXAMPLES = ("refuse", "truncate_prompt")  # what to do with an example longer than a row

FORMATS = ("prompt_completion", "messages")


class SFTDataError(LoopUSError, ValueError):
    """An SFT example that cannot be turned into a row."""


def sft_format(source: Source) -> str | None:
    """`prompt_completion` or `messages` from the fields of the corpus's first record; None: plain text."""
    files = source.train or []
    if source.hf is not None or not files or files[0].suffix != ".jsonl":
        return None
    for _, _, record in read_jsonl_records(files[0], "the fields of a training example"):
        if "messages" in record:
            return "messages"
        if "prompt" in record and "completion" in record:
            return "prompt_completion"
        return None
    return None


def sequence_start(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text when it encodes a sequence (its BOS, or nothing)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i]
    return []


def read_chat_template(path: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"chat template {file} not found: --chat-template takes a Jinja file")
    return file.read_text(encoding="utf-8")


def _messages(value: Any, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                              and isinstance(m.get("content"), str) for m in value):
        raise SFTDataError(f"{where}: '{field}' must be a list of {{\"role\": str, \"content\": str}} messages")
    return value


class ExampleEncoder:
    """One record -> (token ids, supervised flags), as the module docstring says."""

    def __init__(self, tokenizer, fmt: str, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.template = read_chat_template(chat_template) if chat_template else tokenizer.chat_template
        self.start = sequence_start(tokenizer)
        if tokenizer.eos_token_id is None:
            raise SFTDataError("the tokenizer has no EOS token to end a completion with")

    def __call__(self, record: dict, where: str) -> tuple[list[int], list[bool]]:
        fields = ("messages",) if self.fmt == "messages" else ("prompt", "completion")
        if not all(f in record for f in fields):
            raise SFTDataError(f"{where}: no {' and '.join(repr(f) for f in fields)} field, which the first "
                               "example has: one format per corpus")
        if self.fmt == "messages":
            pieces = self._conversation(_messages(record["messages"], where, "messages"), None, where)
        elif isinstance(record["prompt"], str) and isinstance(record["completion"], str):
            pieces = [(record["prompt"], False), (record["completion"], True)]
        elif isinstance(record["prompt"], list):
            prompt = _messages(record["prompt"], where, "prompt")
            completion = _messages(record["completion"], where, "completion")
            pieces = self._conversation(prompt + completion, len(prompt), where)
        else:
            raise SFTDataError(f"{where}: 'prompt' and 'completion' must both be strings, or both lists of messages")
        encoded = self.tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
        ids, supervised = [], []
        for piece, (_, flag) in zip(encoded, pieces):
            ids += piece
            supervised += [flag] * len(piece)
        if self.fmt == "prompt_completion" and isinstance(record["prompt"], str):
            ids.append(self.tokenizer.eos_token_id)
            supervised.append(True)
        if ids[: len(self.start)] != self.start:
            ids, supervised = self.start + ids, [False] * len(self.start) + supervised
        if not any(supervised):
            raise SFTDataError(f"{where}: no assistant message, so nothing to supervise")
        return ids, supervised

    def _render(self, messages: list[dict], generation_prompt: bool, where: str) -> str:
        if self.template is None:
            raise SFTDataError(f"{where}: conversational data needs a chat template and this tokenizer has none "
                               "(a base model's): pass a Jinja template with --chat-template FILE")
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja2 errors, the template's own raise_exception
            raise SFTDataError(f"{where}: the chat template failed on this conversation "
                               f"({type(err).__name__}: {err})") from err

    def _conversation(self, messages: list[dict], first: int | None, where: str) -> list[tuple[str, bool]]:
        """Text pieces of the rendered conversation, each flagged supervised or not: the assistant messages
        (from message `first` on, or all)."""
        full = self._render(messages, False, where)
        pieces, done = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or (first is not None and i < first):
                continue
            before = self._render(messages[:i], True, where) if i else ""
            through = self._render(messages[: i + 1], False, where)
            if not (full.startswith(through) and through.startswith(before) and len(before) >= done):
                raise SFTDataError(f"{where}: the chat template does not render the conversation up to message "
                                   f"{i} as the start of the whole, so the assistant's tokens cannot be told "
                                   "apart: use a template that does (--chat-template FILE)")
            pieces += [(full[done : len(before)], False), (through[len(before) :], True)]
            done = len(through)
        return pieces + [(full[done:], False)]


def fit(ids: list[int], supervised: list[bool], width: int, keep: int,
        truncate: bool) -> tuple[list[int], list[bool]] | None:
    """The example within `width` tokens: as it is, with prompt tokens after its first `keep` dropped from
    the left when `truncate` (never a supervised one), or None where it cannot fit."""
    excess = len(ids) - width
    if excess <= 0:
        return ids, supervised
    if truncate and supervised.index(True) - keep >= excess:
        return ids[:keep] + ids[keep + excess :], supervised[:keep] + supervised[keep + excess :]
    return None


def stored_row(ids: list[int], supervised: list[bool], width: int) -> list[int]:
    """A row as `data.split_row` reads it: labels as ids, input-only tokens encoded, padding after."""
    row = [t if s else INPUT_ONLY - t for t, s in zip(ids, supervised)]
    return row + [PAD_SLOT] * (width - len(row))


def _records(source: Source, split: str, val_fraction: float) -> Iterator[tuple[str, dict]]:
    """("FILE:LINE", record) of a split: its files, or the hash split of the training files."""
    hashed = source.valid is None
    for path in source.train if hashed or split == "train" else source.valid:
        if path.suffix != ".jsonl":
            raise SFTDataError(f"{path}: SFT data is read from .jsonl files (one example per line)")
        for number, line, record in read_jsonl_records(path, "the fields of a training example"):
            if hashed and held_out(line.strip(), val_fraction) != (split == "valid"):
                continue
            yield f"{path}:{number}", record


def sft_rows(tokenizer, source: Source, fmt: str, seq_len: int, n_train: int, n_valid: int, val_fraction: float,
             chat_template: str | None = None, long_examples: str = "refuse") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Training rows (at most `n_train` examples), validation rows (at most `n_valid`) and the report."""
    if long_examples not in LONG_EXAMPLES:
        raise ValueError(f"long_examples must be one of {LONG_EXAMPLES}, got {long_examples!r}")
    encode = ExampleEncoder(tokenizer, fmt, chat_template)
    width = seq_len + 1
    truncate = long_examples == "truncate_prompt"
    too_long, longest, truncated, parts = [], 0, 0, []
    for split, count in (("train", n_train), ("valid", n_valid)):
        rows = []
        for where, record in _records(source, split, val_fraction) if count else ():
            ids, supervised = encode(record, where)
            fitted = fit(ids, supervised, width, len(encode.start), truncate)
            if fitted is None:
                too_long.append(where)
                longest = max(longest, len(ids))
                continue
            truncated += len(fitted[0]) < len(ids)
            rows.append(stored_row(*fitted, width))
            if len(rows) == count:
                break
        parts.append(torch.tensor(rows, dtype=torch.int32).reshape(-1, width))
    if too_long:
        shown = ", ".join(too_long[:5]) + (", ..." if len(too_long) > 5 else "")
        remedy = ("even without their prompts; raise --seq-len" if truncate else
                  "raise --seq-len, or pass --long-examples truncate_prompt to cut their prompts from the left")
        raise SFTDataError(f"{len(too_long)} SFT example(s) do not fit in a row of --seq-len {seq_len} + 1 tokens "
                           f"({shown}; the longest has {longest} tokens): {remedy}")
    report = {"format": fmt, "examples": int(parts[0].shape[0]), "valid_examples": int(parts[1].shape[0]),
              "truncated": truncated}
    return parts[0], parts[1], report
