"""Reading text: documents from .jsonl and .txt files, and token windows for scoring.

Training (`train.data`), evaluation (`eval.perplexity`) and the split analysis (`dynamics`) all read
text the same way, so the readers live here rather than in any one of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

IGNORE_INDEX = -100  # the label the loss skips (PyTorch's cross-entropy default)


def read_jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    """The non-empty `text_field` values of a JSON Lines file, with line-numbered errors."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{number} is not valid JSON ({err})") from err
            if text_field not in record:
                raise ValueError(f"{path}:{number} has no '{text_field}' field (set --text-field)")
            text = record[text_field]
            if text and text.strip():
                yield text


def read_documents(path: Path) -> list[str]:
    """An evaluation file's documents: one per JSONL line (`text` field), or a whole text file as one."""
    if path.suffix == ".jsonl":
        return list(read_jsonl_texts(path, "text"))
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
    paragraph: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                paragraph.append(line.rstrip("\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def read_text_files(paths: list[Path], text_field: str) -> Iterator[str]:
    for path in paths:
        if path.suffix == ".jsonl":
            yield from read_jsonl_texts(path, text_field)
        elif path.suffix == ".txt":
            yield from read_txt_paragraphs(path)
        else:
            raise ValueError(f"unsupported data file {path}: use .jsonl (with a text field) or .txt")
