"""Shared helpers for the training tests: a character tokenizer and tiny models/corpora (no hub)."""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import loopus
from conftest import tiny_base

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,;:!?'-()\n"


def char_tokenizer(vocab_size: int = 97) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in CHARS:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


WORDS = ("the cat sat on the mat. a dog ran to the park. the sun is warm today. we like to read books. "
         "rivers flow into the sea. birds sing in the morning. ").split(". ")


def write_corpus(root: Path, name: str = "tiny", docs: int = 200, seed: int = 0) -> Path:
    """A small, learnable corpus: NAME/train.jsonl and NAME/valid.jsonl under `root`."""
    import random

    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", docs), ("valid", max(4, docs // 10))):
        with (folder / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                text = ". ".join(rng.choice(WORDS).strip() for _ in range(rng.randint(2, 6))) + "."
                f.write(json.dumps({"text": text}) + "\n")
    return folder


def tiny_loopus(family: str = "llama", seed: int = 0, encoder: int = 1, decoder: int = 1):
    return loopus.convert(tiny_base(family, seed).train(), encoder, decoder, gate_rank=8)
