"""Reading and writing the JSON Lines files of the generated tasks."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_splits(folder: Path, splits: dict[str, list[dict]]) -> dict[str, Path]:
    """`folder/<split>.jsonl` for every split, one row a line; returns the files by split."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        files[split] = folder / f"{split}.jsonl"
        with open(files[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return files
