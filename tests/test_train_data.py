"""Packed training data: sources, separators, deterministic shuffle, validation split, mixing."""

from __future__ import annotations

import json
import re

import pytest
import torch

from loopus.train.data import IGNORE_INDEX, build_data, parse_corpus, resolve_source, split_row
from test_train_helpers import char_tokenizer, write_corpus

torch.set_num_threads(1)


def test_corpus_specs_parse_weights():
    assert parse_corpus("enwiki").weight == 1.0
    assert parse_corpus("enwiki=0.7").source == "enwiki" and parse_corpus("enwiki=0.7").weight == 0.7
    assert parse_corpus("hf:wikitext:wikitext-2-raw-v1").source == "hf:wikitext:wikitext-2-raw-v1"
    with pytest.raises(ValueError, match="weight"):
        parse_corpus("enwiki=0")


def test_packing_separates_documents_and_ignores_the_next_bos(tmp_path):
    write_corpus(tmp_path)
    tok = char_tokenizer()
    data = build_data(tok, ["tiny"], str(tmp_path), seq_len=16, train_rows=20, valid_rows=3)
    assert data.train.shape == (20, 17) and data.valid.shape == (3, 17)
    first = json.loads((tmp_path / "tiny" / "train.jsonl").read_text().splitlines()[0])["text"]
    ids = tok(first, add_special_tokens=False)["input_ids"]
    stream = data.train[0].tolist()
    assert stream[0] == tok.bos_token_id and stream[1 : 1 + min(16, len(ids))] == ids[:16]
    # rows overlap by one token: the last input of a row is the first token of the next row
    assert data.train[0, -1] == data.train[1, 0]
    inputs, labels = data.batch(0, 4)
    assert inputs.shape == labels.shape == (4, 16)
    inputs, labels = split_row(data.train, data.bos)
    ignored = labels == IGNORE_INDEX
    assert ignored.any()  # predicting a new document's BOS is not asked
    assert (data.train[:, 1:][ignored] == tok.bos_token_id).all()
    # every document ends with EOS right before the next BOS
    before_bos = inputs[ignored]
    assert (before_bos == tok.eos_token_id).all()


def test_shuffle_is_deterministic_and_seeded(tmp_path):
    write_corpus(tmp_path)
    tok = char_tokenizer()
    a = build_data(tok, ["tiny"], str(tmp_path), 16, 30, 2, seed=1)
    b = build_data(tok, ["tiny"], str(tmp_path), 16, 30, 2, seed=1)
    c = build_data(tok, ["tiny"], str(tmp_path), 16, 30, 2, seed=2)
    assert torch.equal(a.batch(3, 4)[0], b.batch(3, 4)[0])
    assert not torch.equal(a.indices(0, 30), c.indices(0, 30))
    # one epoch visits every row once; the next epoch reshuffles
    assert sorted(a.indices(0, 30).tolist()) == list(range(30))
    assert sorted(a.indices(30, 30).tolist()) == list(range(30))
    # ranks read disjoint slices of the same global batch
    r0, r1 = a.batch(2, 3, rank=0, world=2)[0], a.batch(2, 3, rank=1, world=2)[0]
    assert torch.equal(torch.cat([r0, r1]), a.train[a.indices(12, 6)][:, :-1].long())


def test_weighted_mixing_and_hash_validation_split(tmp_path):
    write_corpus(tmp_path, "a", seed=1)
    other = tmp_path / "b.txt"
    other.write_text("\n\n".join(f"paragraph number {i} about rivers and birds." for i in range(300)))
    tok = char_tokenizer()
    data = build_data(tok, ["a=3", str(other) + "=1"], str(tmp_path), 64, 40, 8, val_fraction=0.1)
    assert data.mix == {"a": 30, str(other): 10}
    src = resolve_source(str(other), None)
    assert src.valid is None  # held out by document hash
    def numbers(rows):
        text = "".join(tok.convert_ids_to_tokens(rows.flatten().tolist()))
        return set(re.findall(r"number (\d+) about", text))

    valid_numbers, train_numbers = numbers(data.valid[6:]), numbers(data.train[30:])
    assert valid_numbers and train_numbers and not valid_numbers & train_numbers


def test_hf_corpus_reads_a_local_dataset_through_datasets(tmp_path, monkeypatch):
    """`hf:NAME` goes through `datasets.load_dataset`; a local dataset folder needs no hub."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "hf_local"
    folder.mkdir()
    for split, count in (("train", 12), ("validation", 3)):
        rows = [json.dumps({"body": f"{split} document number {i} " * 4}) for i in range(count)]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    tok = char_tokenizer()
    data = build_data(tok, [f"hf:{folder}"], None, seq_len=16, train_rows=8, valid_rows=2, text_field="body")
    assert data.train.shape == (8, 17) and data.valid.shape == (2, 17)

    def text(rows) -> str:  # the character tokenizer decodes with a space between characters
        return "".join(tok.decode(r, skip_special_tokens=True) for r in rows).replace(" ", "")

    assert text(data.train[:1]).startswith("traindocum") and "validation" not in text(data.train)
    assert text(data.valid[:1]).startswith("validationdocum") and "train" not in text(data.valid)
    with pytest.raises(RuntimeError, match="could not open HF dataset"):
        build_data(tok, [f"hf:{tmp_path / 'absent'}"], None, seq_len=16, train_rows=2, valid_rows=1)


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        build_data(char_tokenizer(), ["nope"], str(tmp_path), 16, 4, 1)


@pytest.mark.real
def test_default_enwiki_corpus_with_the_gemma_tokenizer(gemma, data_dir):
    _, tokenizer = gemma
    data = build_data(tokenizer, ["enwiki"], str(data_dir), seq_len=128, train_rows=8, valid_rows=2)
    assert data.train.shape == (8, 129)
    text = tokenizer.decode(data.train[0].tolist())
    assert len(text) > 200
    # validation comes from enwiki/valid.jsonl, not from the training file
    first_valid = json.loads((data_dir / "enwiki" / "valid.jsonl").open().readline())["text"]
    assert tokenizer.decode(data.valid[0, 1:20].tolist()) in first_valid
