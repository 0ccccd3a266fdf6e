"""Where a corpus's documents come from (data directory, file, HF dataset) and how a stored row encodes
its tokens. Shared by plain-text packing (`data`) and supervised examples (`sft`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import LoopUSError, MissingDependencyError
from ..paths import data_path as resolve_data_path
from ..text import read_text_files

PAD_SLOT = -1  # padding in a stored row: an ignored label, and never attended by the tokens before it
INPUT_ONLY = -2  # a token read but never a label (an SFT prompt's) is stored as INPUT_ONLY - id


@dataclass(frozen=True)
class CorpusSpec:
    source: str
    weight: float = 1.0


def parse_corpus(spec: str) -> CorpusSpec:
    """`enwiki`, `enwiki=0.7`, `/path/file.jsonl=2`, `hf:wikitext:wikitext-2-raw-v1`."""
    source, weight = spec, 1.0
    if "=" in spec:
        head, _, tail = spec.rpartition("=")
        try:
            weight = float(tail)
            source = head
        except ValueError:
            pass
    if weight <= 0:
        raise ValueError(f"corpus weight must be > 0, got {weight} in {spec!r}")
    return CorpusSpec(source.strip(), weight)


class DataSourceError(LoopUSError, RuntimeError):
    """A corpus that cannot be opened."""


def _files_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in (".jsonl", ".txt") and p.is_file())


@dataclass
class Source:
    """Where a corpus's training and (optional) validation documents come from."""

    name: str
    train: list[Path] | None = None
    valid: list[Path] | None = None
    hf: tuple[str, str | None] | None = None

    def documents(self, split: str, text_field: str) -> Iterator[str] | None:
        if self.hf is not None:
            return _hf_documents(self.hf, split, text_field)
        files = self.train if split == "train" else self.valid
        return read_text_files(files, text_field) if files else None


def _hf_documents(spec: tuple[str, str | None], split: str, text_field: str) -> Iterator[str] | None:
    try:
        import datasets
    except ImportError as err:
        raise MissingDependencyError("hf: corpora need the 'datasets' package: pip install datasets") from err
    name, config = spec
    split_name = "train" if split == "train" else "validation"
    try:
        if split_name not in datasets.get_dataset_split_names(name, config):
            return None
        dataset = datasets.load_dataset(name, config, split=split_name, streaming=True)
    except Exception as err:  # hub unreachable, unknown dataset, ...
        raise DataSourceError(f"could not open HF dataset {name!r} ({type(err).__name__}: {err}): check the name "
                              "and config, or point at local .jsonl/.txt files") from err
    return (row[text_field] for row in dataset if row.get(text_field, "").strip())


def resolve_source(source: str, data: str | None) -> Source:
    """Turn a corpus spec into files (or an HF dataset), with a clear error when nothing matches."""
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        return Source(source, hf=(name, config or None))
    path = Path(source).expanduser()
    if not path.exists():
        root = resolve_data_path(data)
        if root.is_file():
            # --data FILE: that file is the corpus, whatever the (default) corpus name
            return Source(str(root), train=[root])
        candidates = [root / source, root / f"{source}.jsonl", root / f"{source}.txt"]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise FileNotFoundError(f"corpus {source!r} not found in the data directory {root}")
        path = found[0]
    if path.is_file():
        return Source(source, train=[path])
    if (path / "train.jsonl").is_file():
        valid = path / "valid.jsonl"
        return Source(source, train=[path / "train.jsonl"], valid=[valid] if valid.is_file() else None)
    files = [f for f in _files_in(path) if not f.stem.startswith(("valid", "test"))]
    valid = [f for f in _files_in(path) if f.stem.startswith("valid")]
    if not files:
        raise FileNotFoundError(f"{path} holds no .jsonl or .txt files")
    return Source(source, train=files, valid=valid or None)


def held_out(text: str, fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction
