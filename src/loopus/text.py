"""Reading text: documents from .jsonl and .txt files, and token windows for scoring.

Training (`train.data`), evaluation (`eval.perplexity`) and the split analysis (`dynamics`) all read
text the same way, so the readers live here rather than in any one of them.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

IGNORE_INDEX = -100  # the label the loss skips (PyTorch's cross-entropy default)


@contextlib.contextmanager
def _utf8(path: Path) -> Iterator[None]:
    """Name the file in a decoding error (a binary or non-UTF-8 file given as text)."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason}): pass a .jsonl or .txt file in UTF-8") from None


def read_jsonl_records(path: Path, fields: str) -> Iterator[tuple[int, str, dict]]:
    """(line number, line, object) of each non-blank line of a JSON Lines file, with line-numbered errors;
    `fields` names what the objects should hold, for the error on a line that is not an object."""
    with _utf8(path), path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{number} is not valid JSON ({err})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number} is a {type(record).__name__}, not a JSON object with "
                                 f"{fields}: write one object per line")
            yield number, line, record


def read_jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    """The non-empty `text_field` values of a JSON Lines file, with line-numbered errors (null counts as empty)."""
    for number, _, record in read_jsonl_records(path, f"a '{text_field}' field"):
        if text_field not in record:
            raise ValueError(f"{path}:{number} has no '{text_field}' field (set --text-field)")
        text = record[text_field]
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{path}:{number} has '{text_field}': {text!r:.40} ({type(text).__name__}), "
                             "not a string")
        if text and text.strip():
            yield text


def read_documents(path: Path) -> list[str]:
    """An evaluation file's documents: one per JSONL line (`text` field), or a whole text file as one."""
    if path.suffix == ".jsonl":
        return list(read_jsonl_texts(path, "text"))
    with _utf8(path):
        return [path.read_text(encoding="utf-8")]


def token_windows(ids: list[int], bos: int | None, length: int, min_tokens: int = 1,
                  carry_previous: bool = False) -> list[list[int]]:
    """Disjoint chunks of `length` tokens, each led by BOS; without a BOS, by the token before the chunk
    if `carry_previous` (so the chunk's first token is predicted too). Chunks under `min_tokens` are dropped."""
    out = []
    for start in range(0, len(ids), length):
        chunk = ids[start : start + length]
        if len(chunk) < min_tokens:
            continue
        prefix = [bos] if bos is not None else ids[max(0, start - 1) : start] if carry_previous else []
        out.append(prefix + chunk)
    return out


def read_txt_paragraphs(path: Path) -> Iterator[str]:
    """The documents of a text file: paragraphs separated by blank lines."""
    paragraph: list[str] = []
    with _utf8(path), path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                paragraph.append(line.rstrip("\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def read_text_files(paths: list[Path], text_field: str) -> Iterator[str]:
    """The documents of .jsonl and .txt files, in order."""
    for path in paths:
        if path.suffix == ".jsonl":
            yield from read_jsonl_texts(path, text_field)
        elif path.suffix == ".txt":
            yield from read_txt_paragraphs(path)
        else:
            raise ValueError(f"unsupported data file {path}: use .jsonl (with a text field) or .txt")
