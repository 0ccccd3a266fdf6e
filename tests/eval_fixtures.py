"""Shared helpers for the evaluation tests: a tiny random Gemma 3 with the real Gemma tokenizer
(so lm-eval sees real text tokenisation), saved as a base checkpoint and as a converted LoopUS one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import tiny_base
from transformers import AutoTokenizer

import loopus

GEMMA_DIR = Path.home() / ".cache" / "loopus" / "base" / "gemma-3-270m"


def gemma_tokenizer():
    from loopus.zoo import resolve

    return AutoTokenizer.from_pretrained(resolve("gemma-3-270m"))


def make_tiny_checkpoints(root: Path, num_loops: int = 1) -> tuple[Path, Path]:
    """(base_dir, loopus_dir) under `root`: a tiny random Gemma 3 and its LoopUS conversion (2 / 1 layers)."""
    # the real tokenizer's vocabulary, and room for lm-eval's longer requests
    base = tiny_base("gemma3_text", vocab_size=262144, max_position_embeddings=512, sliding_window=8)
    with torch.no_grad():  # larger weights than the init, so the loop and gate visibly change the scores
        for p in base.model.layers.parameters():
            p.mul_(4.0)
    tok = gemma_tokenizer()
    base_dir, loop_dir = root / "base", root / "loopus"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model = loopus.convert(base, 2, 1)
    model.config.num_loops = num_loops
    model.save_pretrained(loop_dir)
    tok.save_pretrained(loop_dir)
    return base_dir, loop_dir


def write_winogrande(root: Path, labels: list[str] | None = None) -> Path:
    """A small winogrande/dev.jsonl + dev-labels.lst in the official release format."""
    rows = [
        {"qID": "3QHARXY-1", "sentence": "John moved the couch from the garage to the backyard to create space. The _ is small.",
         "option1": "garage", "option2": "backyard", "answer": "1"},
        {"qID": "3QHARXY-2", "sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
         "option1": "trophy", "option2": "suitcase", "answer": "1"},
        {"qID": "3QHARXY-3", "sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"},
        {"qID": "3QHARXY-4", "sentence": "The cat chased the mouse until the _ was too tired to run away.",
         "option1": "cat", "option2": "mouse", "answer": "2"},
    ]
    folder = root / "winogrande"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "dev-labels.lst").write_text("\n".join(labels or [r["answer"] for r in rows]) + "\n")
    return folder


def write_openbookqa(root: Path) -> Path:
    """A small openbookqa/test.jsonl in the official (Main) release format."""
    rows = [
        {"id": "7-980", "question": {"stem": "The sun is responsible for", "choices": [
            {"text": "puppies learning new tricks", "label": "A"}, {"text": "children growing up and getting old", "label": "B"},
            {"text": "flowers wilting in a vase", "label": "C"}, {"text": "plants sprouting, blooming and wilting", "label": "D"}]},
         "answerKey": "D"},
        {"id": "7-584", "question": {"stem": "When standing miles away from Mount Rushmore", "choices": [
            {"text": "the mountains seem very close", "label": "A"}, {"text": "the mountains are boring", "label": "B"},
            {"text": "the mountains look the same as from up close", "label": "C"},
            {"text": "the mountains seem smaller than in photographs", "label": "D"}]},
         "answerKey": "D"},
        {"id": "7-870", "question": {"stem": "When food is reduced in the stomach", "choices": [
            {"text": "the mind needs time to digest", "label": "A"}, {"text": "take a second to digest what I said", "label": "B"},
            {"text": "nutrients are being deconstructed", "label": "C"}, {"text": "reader's digest is a body of works", "label": "D"}]},
         "answerKey": "C"},
    ]
    folder = root / "openbookqa"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
