"""Training data: documents from local files or HF datasets, tokenised and packed into fixed-length rows.

Sources (a corpus spec, optionally followed by `=WEIGHT`):

- `NAME`             a corpus in the data directory: `NAME/train.jsonl` (+ `NAME/valid.jsonl`), or the
                     `.jsonl`/`.txt` files in `NAME/`, or `NAME.jsonl`/`NAME.txt`
- `PATH`             a `.jsonl` file (one JSON object per line, text in `text_field`), a `.txt` file
                     (documents separated by blank lines) or a directory of them
- `hf:NAME[:CONFIG]` anything `datasets.load_dataset` opens: a hub id (needs a reachable hub or a local
                     HF cache) or a local dataset folder (`train.jsonl`, `validation.jsonl`, parquet ...)

When the data setting (`--data`) is itself a `.jsonl`/`.txt` file, that file is the corpus: a corpus
`NAME` (the default `enwiki` included) reads it, so `--data FILE.jsonl` alone trains on FILE.

Packing (`packing=`):
- "documents" (default): every row lies inside one document and starts the way the tokenizer starts
  a sequence: `[bos]` + the next `seq_len` tokens of the document (no BOS where the tokenizer has
  none), the document's last row ending in EOS and right-padded, its padding ignored by the loss.
  So training sees what evaluation and generation see (Gemma's perplexity on 128-token enwiki
  windows is 23 after a BOS and 166 without), and no token attends across a document boundary
  (right padding is never attended by the real tokens before it).
- "stream": documents become `[bos] tokens [eos]`, are concatenated and cut into rows of
  `seq_len + 1` tokens with stride `seq_len`; most rows then start mid-document without a BOS and
  attend across document boundaries. The label that would predict the next document's BOS is ignored.
`rows_per_doc=N` (documents packing, training rows only) keeps at most N rows of each document, evenly
spaced through it: a small budget then spreads over many documents instead of the first few long ones
(100k tokens of whole documents are 16 documents of enwiki + ELTeC; at N = 2 they are 400).
Rows are `seq_len + 1` tokens: inputs = row[:-1], labels = row[1:].
Weighted mixing interleaves the corpora row by row (smooth weighted round robin), and rows are
shuffled within blocks of `SHUFFLE_BLOCK` rows, each with a generator seeded by (seed, epoch, block).
So the row at each position depends on the seed and the position only, not on how many rows a run
packs: a run that packs whole blocks reads the same rows in the same order as a longer one.
A corpus without a validation file gives up the documents whose hash falls in `val_fraction`.

Supervised fine-tuning data (JSONL of prompt/completion or messages, detected from the fields) becomes
one example per row, its prompt tokens input only (`sft`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..text import IGNORE_INDEX
from .options import Section, need_at_least, option, parse_strings
from .recipes import DEFAULT
from .sft import LONG_EXAMPLES, sft_format, sft_rows
from .sources import INPUT_ONLY, PAD_SLOT, held_out, parse_corpus, resolve_source

PACKINGS = ("documents", "stream")


class Packer:
    """Tokenise documents in order and cut them into rows (see the module docstring for `packing`)."""

    def __init__(self, tokenizer, seq_len: int, batch_docs: int = 64, packing: str = "documents"):
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_docs = batch_docs
        self.packing = packing
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ValueError("the tokenizer has no EOS token to separate packed documents")

    def rows(self, documents: Iterable[str], max_rows: int, rows_per_doc: int | None = None) -> torch.Tensor:
        if self.packing == "documents":
            return self._document_rows(documents, max_rows, rows_per_doc)
        if rows_per_doc is not None:
            raise ValueError("rows_per_doc needs packing='documents' (a stream has no document rows)")
        return self._stream_rows(documents, max_rows)

    def _encoded(self, documents: Iterable[str]) -> Iterator[list[int]]:
        """Token ids of each document, tokenised `batch_docs` at a time."""
        pending: list[str] = []
        for doc in documents:
            pending.append(doc)
            if len(pending) >= self.batch_docs:
                yield from self.tokenizer(pending, add_special_tokens=False)["input_ids"]
                pending = []
        if pending:
            yield from self.tokenizer(pending, add_special_tokens=False)["input_ids"]

    def _document_rows(self, documents: Iterable[str], max_rows: int, rows_per_doc: int | None) -> torch.Tensor:
        width = self.seq_len + 1
        start = [self.bos] if self.bos is not None else []
        body = width - len(start)  # document tokens per row
        rows: list[list[int]] = []
        for ids in self._encoded(documents):
            ids = ids + [self.eos]
            # Each document token is a label once; without a BOS a row's first token is context only.
            offsets = range(0, len(ids) - (0 if start else 1), self.seq_len)
            if rows_per_doc is not None and len(offsets) > rows_per_doc:
                offsets = [offsets[i * len(offsets) // rows_per_doc] for i in range(rows_per_doc)]
            for offset in offsets:
                piece = ids[offset : offset + body]
                rows.append(start + piece + [PAD_SLOT] * (body - len(piece)))
                if len(rows) == max_rows:
                    return torch.tensor(rows, dtype=torch.int32)
        return torch.tensor(rows, dtype=torch.int32).reshape(-1, width)

    def _stream_rows(self, documents: Iterable[str], max_rows: int) -> torch.Tensor:
        width = self.seq_len + 1
        need = max_rows * self.seq_len + 1
        stream: list[int] = []
        for ids in self._encoded(documents):
            if self.bos is not None:
                stream.append(self.bos)
            stream.extend(ids)
            stream.append(self.eos)
            if len(stream) >= need:
                break
        count = min(max_rows, max(0, (len(stream) - 1) // self.seq_len))
        if count == 0:
            return torch.zeros(0, width, dtype=torch.int32)
        rows = torch.as_strided(
            torch.tensor(stream[: count * self.seq_len + 1], dtype=torch.int32), (count, width), (self.seq_len, 1)
        )
        return rows.clone()


SHUFFLE_BLOCK = 1024  # rows shuffled together


@dataclass
class PackedData:
    """Packed training and validation rows plus the deterministic order in which batches are drawn."""

    train: torch.Tensor          # (rows, seq_len + 1) int32
    valid: torch.Tensor
    bos: int | None
    seed: int
    mix: dict[str, int]
    sources: torch.Tensor        # index into `mix` of each training row's corpus
    report: dict[str, dict] = field(default_factory=dict)  # per SFT corpus: format, examples, truncated

    def _order(self, epoch: int) -> torch.Tensor:
        n, blocks = self.train.shape[0], []
        for block, first in enumerate(range(0, n, SHUFFLE_BLOCK)):
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033 + block)
            blocks.append(torch.randperm(min(SHUFFLE_BLOCK, n - first), generator=generator) + first)
        return torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.long)

    def mix_of(self, rows: int) -> dict[str, int]:
        """Rows per corpus among the first `rows` positions of the stream (what a run of that many reads)."""
        counts = torch.bincount(self.sources[self.indices(0, min(rows, len(self.train)))], minlength=len(self.mix))
        return dict(zip(self.mix, counts.tolist()))

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Row indices for positions start..start+count of the endless shuffled stream."""
        n = self.train.shape[0]
        out = []
        position = start
        cached: dict[int, torch.Tensor] = {}
        while len(out) < count:
            epoch, offset = divmod(position, n)
            if epoch not in cached:
                cached[epoch] = self._order(epoch)
            take = min(n - offset, count - len(out))
            out.extend(cached[epoch][offset : offset + take].tolist())
            position += take
        return torch.tensor(out, dtype=torch.long)

    def batch(self, global_index: int, batch_size: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `global_index` (counted over the whole run), this rank's share of it."""
        start = (global_index * world + rank) * batch_size
        rows = self.train[self.indices(start, batch_size)]
        return split_row(rows, self.bos)

    def valid_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = self.valid[rank::world]
        return [split_row(rows[i : i + batch_size], self.bos) for i in range(0, rows.shape[0], batch_size)]


def split_row(rows: torch.Tensor, bos: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of stored rows: labels of a BOS, of padding and of input-only tokens are ignored;
    padding inputs become token 0."""
    rows = rows.long()
    tokens = torch.where(rows <= INPUT_ONLY, INPUT_ONLY - rows, rows)
    inputs, labels = tokens[:, :-1].contiguous(), rows[:, 1:].clone()
    if bos is not None:
        labels[labels == bos] = IGNORE_INDEX
    labels[labels < 0] = IGNORE_INDEX  # padding and input-only tokens
    inputs[inputs == PAD_SLOT] = 0  # any id: causal attention never lets earlier tokens see it
    return inputs, labels


def interleave(weights: list[float], total: int) -> list[int]:
    """The corpus of each of `total` stream positions by smooth weighted round robin: position i's corpus
    does not depend on `total`, and every prefix holds the corpora in proportion to their weights."""
    credit, owners = [0.0] * len(weights), []
    for _ in range(total):
        credit = [c + w for c, w in zip(credit, weights)]
        pick = max(range(len(weights)), key=lambda i: credit[i])
        credit[pick] -= sum(weights)
        owners.append(pick)
    return owners


def build_data(
    tokenizer,
    corpus: list[str],
    data: str | None,
    seq_len: int,
    train_rows: int,
    valid_rows: int,
    seed: int = 0,
    text_field: str = "text",
    val_fraction: float = 0.01,
    packing: str = "documents",
    rows_per_doc: int | None = None,
    chat_template: str | None = None,
    long_examples: str = "refuse",
) -> PackedData:
    """Tokenise and pack just enough of each corpus for `train_rows` training rows (mixed by weight);
    validation rows are whole documents whatever `rows_per_doc` says, so they score what `loopus eval` does.
    SFT corpora render conversations with the `chat_template` file (default: the tokenizer's own) and
    treat examples longer than a row as `long_examples` says (`sft.LONG_EXAMPLES`)."""

    specs = [parse_corpus(c) for c in corpus]
    if not specs:
        raise ValueError("no corpus given")
    sources = [resolve_source(s.source, data) for s in specs]
    if data is not None and Path(data).expanduser().is_file():
        reading = [spec.source for spec, src in zip(specs, sources) if src.name == str(Path(data).expanduser())]
        if len(reading) > 1:
            raise ValueError(f"corpora {reading} would all read --data {data}: a data file is one corpus; to mix "
                             "several, pass a data directory or give each corpus as a file path")
    report: dict[str, dict] = {}  # per SFT corpus
    packer = Packer(tokenizer, seq_len, packing=packing)
    weights = [s.weight for s in specs]
    owners, valid_owners = interleave(weights, train_rows), interleave(weights, valid_rows)
    train_counts = [owners.count(i) for i in range(len(specs))]
    valid_counts = [valid_owners.count(i) for i in range(len(specs))]
    train_parts, valid_parts, mix = [], [], {}
    for source, n_train, n_valid in zip(sources, train_counts, valid_counts):
        fmt = sft_format(source)
        if fmt is not None:
            if packing != "documents" or rows_per_doc is not None:
                raise ValueError(f"corpus {source.name!r} is SFT data ({fmt}), one example per row: --packing "
                                 "stream and --rows-per-doc do not apply to it")
            train, valid, report[source.name] = sft_rows(tokenizer, source, fmt, seq_len, n_train, n_valid,
                                                         val_fraction, chat_template, long_examples)
        else:
            valid_docs = source.documents("valid", text_field)
            if valid_docs is None:
                # no validation file: a hash-based document split of the training file
                train_docs = (d for d in source.documents("train", text_field) if not held_out(d, val_fraction))
                valid_docs = (d for d in source.documents("train", text_field) if held_out(d, val_fraction))
            else:
                train_docs = source.documents("train", text_field)
            train = packer.rows(train_docs, n_train, rows_per_doc)
            valid = packer.rows(valid_docs, n_valid) if n_valid else torch.zeros(0, seq_len + 1, dtype=torch.int32)
        if train.shape[0] == 0 and n_train > 0:
            raise ValueError(f"corpus {source.name!r} yielded no training text")
        train_parts.append(train)
        valid_parts.append(valid)
        mix[source.name] = int(train.shape[0])
    # the stream in position order; positions of a corpus that ran out of rows are dropped
    starts, taken, order = torch.tensor([0, *map(len, train_parts)]).cumsum(0).tolist(), [0] * len(specs), []
    for owner in owners:
        if taken[owner] < len(train_parts[owner]):
            order.append((starts[owner] + taken[owner], owner))
            taken[owner] += 1
    rows, sources = torch.tensor(order, dtype=torch.long).reshape(-1, 2).unbind(1)
    return PackedData(torch.cat(train_parts)[rows], torch.cat(valid_parts), tokenizer.bos_token_id, seed, mix, sources, report)


@dataclass(frozen=True)
class DataConfig(Section):
    """What the run reads and in which order: a resumed run must agree on all of it."""

    data: str | None = option(None, "data directory (default $LOOPUS_DATA) or a .txt/.jsonl file")
    corpus: tuple[str, ...] = option(("enwiki",), "comma list of corpora: NAME, FILE or "
                                     "hf:NAME[:CONFIG], each optionally =WEIGHT", parse=parse_strings)
    text_field: str = option("text", "JSONL field holding the text")
    seq_len: int = option(512, "tokens per packed sequence")
    packing: str = option(DEFAULT["packing"], "documents: every row inside one document, starting with the "
                          "tokenizer's BOS; stream: documents concatenated and cut, rows start mid-document",
                          choices=PACKINGS)
    rows_per_doc: int | None = option(None, "at most N training rows per document, evenly spaced (default: all)",
                                      parse=int)
    batch_size: int = option(4, "sequences per micro-batch per process")
    grad_accum: int = option(1, "micro-batches per optimiser step")
    val_tokens: int = option(16384, "validation tokens")
    val_fraction: float = option(0.01, "documents held out for validation when a corpus has no valid file")
    seed: int = option(0, "seed for init, data order and the horizon/supervision draws")
    chat_template: str | None = option(None, "Jinja chat template file for conversational SFT data "
                                       "(messages); default: the tokenizer's own")
    long_examples: str = option("refuse", "an SFT example longer than a row: refuse (an error naming its line) "
                                "or truncate_prompt (drop prompt tokens from the left; the count is printed and "
                                "logged)", choices=LONG_EXAMPLES)

    def check(self) -> None:
        need_at_least(self, ("seq_len", "batch_size", "grad_accum"), 1)
        if self.packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {self.packing!r}")
        if self.rows_per_doc is not None and (self.rows_per_doc < 1 or self.packing != "documents"):
            raise ValueError(f"rows_per_doc must be >= 1 with packing=documents, got {self.rows_per_doc} with "
                             f"packing={self.packing}")
        if self.long_examples not in LONG_EXAMPLES:
            raise ValueError(f"long_examples must be one of {LONG_EXAMPLES}, got {self.long_examples!r}")

    def tokens_per_step(self, num_processes: int = 1) -> int:
        return self.seq_len * self.batch_size * self.grad_accum * num_processes

    def load(self, tokenizer, train_rows: int) -> PackedData:
        """`build_data` with these options: `train_rows` training rows and `val_tokens` of validation."""
        return build_data(tokenizer, list(self.corpus), self.data, self.seq_len, train_rows,
                          max(1, math.ceil(self.val_tokens / self.seq_len)), self.seed, self.text_field,
                          self.val_fraction, self.packing, self.rows_per_doc, self.chat_template,
                          self.long_examples)
