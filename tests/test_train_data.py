"""Packed training data: sources, separators, deterministic shuffle, validation split, mixing."""

from __future__ import annotations

import json
import re

import pytest
import torch

from loopus.text import IGNORE_INDEX
from loopus.train.data import build_data, split_row
from loopus.train.sources import PAD_SLOT, parse_corpus, resolve_source
from conftest import char_tokenizer
from test_train_helpers import write_corpus

torch.set_num_threads(1)


def real_tokens(rows: torch.Tensor) -> list[int]:
    """The token ids of stored rows without their padding."""
    return [t for t in rows.flatten().tolist() if t != PAD_SLOT]


def test_corpus_specs_parse_weights():
    assert parse_corpus("enwiki").weight == 1.0
    assert parse_corpus("enwiki=0.7").source == "enwiki" and parse_corpus("enwiki=0.7").weight == 0.7
    assert parse_corpus("hf:wikitext:wikitext-2-raw-v1").source == "hf:wikitext:wikitext-2-raw-v1"
    with pytest.raises(ValueError, match="weight"):
        parse_corpus("enwiki=0")


def test_document_rows_start_with_bos_and_stay_inside_one_document(tmp_path):
    write_corpus(tmp_path)
    tok = char_tokenizer()
    data = build_data(tok, ["tiny"], str(tmp_path), seq_len=16, train_rows=40, valid_rows=3)
    assert data.train.shape == (40, 17) and data.valid.shape == (3, 17)
    assert (data.train[:, 0] == tok.bos_token_id).all() and (data.valid[:, 0] == tok.bos_token_id).all()
    docs = [json.loads(line)["text"] for line in (tmp_path / "tiny" / "train.jsonl").read_text().splitlines()]
    expected = []  # [bos] + the next 16 tokens of one document (its last piece ends in EOS), in order
    for doc in docs:
        ids = tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        expected += [ids[i : i + 16] for i in range(0, len(ids), 16)]
    inputs, labels = split_row(data.train, data.bos)
    for row in range(40):
        real = labels[row] != IGNORE_INDEX
        assert labels[row][real].tolist() == expected[row]  # every label is the row's own document
        assert real.tolist() == sorted(real.tolist(), reverse=True)  # padding only at the end
        assert (inputs[row, 1:][real[:-1]] == labels[row, :-1][real[:-1]]).all()
    assert (labels == IGNORE_INDEX).any()  # short last pieces are padded, and their padding is ignored
    assert not (inputs == tok.bos_token_id)[:, 1:].any()  # no second document inside a row


def test_rows_per_doc_keeps_evenly_spaced_rows_of_every_document(tmp_path):
    write_corpus(tmp_path)
    tok = char_tokenizer()
    whole = build_data(tok, ["tiny"], str(tmp_path), seq_len=16, train_rows=10_000, valid_rows=3)
    spread = build_data(tok, ["tiny"], str(tmp_path), seq_len=16, train_rows=10_000, valid_rows=3, rows_per_doc=2)
    docs = [json.loads(line)["text"] for line in (tmp_path / "tiny" / "train.jsonl").read_text().splitlines()]
    expected = []  # rows 0 and n // 2 of a document of n rows; all rows of a shorter one
    for doc in docs:
        ids = tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        pieces = [ids[i : i + 16] for i in range(0, len(ids), 16)]
        expected += pieces if len(pieces) <= 2 else [pieces[0], pieces[len(pieces) // 2]]
    assert any(len(tok(d, add_special_tokens=False)["input_ids"]) > 32 for d in docs)  # some documents are cut
    _, labels = split_row(spread.train, spread.bos)
    assert [row[row != IGNORE_INDEX].tolist() for row in labels] == expected
    assert spread.train.shape[0] < whole.train.shape[0]
    assert torch.equal(spread.valid, whole.valid)  # validation still scores whole documents
    with pytest.raises(ValueError, match="rows_per_doc needs packing='documents'"):
        build_data(tok, ["tiny"], str(tmp_path), seq_len=16, train_rows=4, valid_rows=1, packing="stream",
                   rows_per_doc=2)


def test_stream_packing_separates_documents_and_ignores_the_next_bos(tmp_path):
    write_corpus(tmp_path)
    tok = char_tokenizer()
    data = build_data(tok, ["tiny"], str(tmp_path), seq_len=16, train_rows=20, valid_rows=3, packing="stream")
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
    a = build_data(tok, ["tiny"], str(tmp_path), 16, 30, 2, seed=1, packing="stream")
    b = build_data(tok, ["tiny"], str(tmp_path), 16, 30, 2, seed=1, packing="stream")
    c = build_data(tok, ["tiny"], str(tmp_path), 16, 30, 2, seed=2, packing="stream")
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
        text = "".join(tok.convert_ids_to_tokens(real_tokens(rows)))
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
        return "".join(tok.decode(real_tokens(r), skip_special_tokens=True) for r in rows).replace(" ", "")

    assert text(data.train[:1]).startswith("traindocum") and "validation" not in text(data.train)
    assert text(data.valid[:1]).startswith("validationdocum") and "train" not in text(data.valid)
    with pytest.raises(RuntimeError, match="could not open HF dataset"):
        build_data(tok, [f"hf:{tmp_path / 'absent'}"], None, seq_len=16, train_rows=2, valid_rows=1)


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        build_data(char_tokenizer(), ["nope"], str(tmp_path), 16, 4, 1)


def test_a_data_file_is_the_corpus(tmp_path):
    """`--data FILE.jsonl` / `FILE.txt`: the file is the corpus, read under the (default) corpus name."""
    tok = char_tokenizer()

    def text(rows):
        return "".join(tok.convert_ids_to_tokens(real_tokens(rows)))

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"jsonl document {i} about rivers."}) + "\n" for i in range(200)))
    data = build_data(tok, ["enwiki"], str(jsonl), seq_len=16, train_rows=12, valid_rows=2, val_fraction=0.1)
    assert data.train.shape == (12, 17) and data.valid.shape == (2, 17)
    assert data.mix == {str(jsonl): 12}
    assert "jsonl document" in text(data.train) and "jsonl document" in text(data.valid)
    assert resolve_source("anything", str(jsonl)).train == [jsonl]

    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(f"text paragraph {i} about birds." for i in range(200)))
    data = build_data(tok, ["enwiki"], str(txt), seq_len=16, train_rows=6, valid_rows=1)
    assert data.mix == {str(txt): 6} and "text paragraph" in text(data.train)
    # an explicit corpus path still wins over the data file
    data = build_data(tok, [str(jsonl)], str(txt), seq_len=16, train_rows=4, valid_rows=1)
    assert data.mix == {str(jsonl): 4}

    with pytest.raises(ValueError, match="a data file is one corpus"):
        build_data(tok, ["a", "b"], str(jsonl), seq_len=16, train_rows=4, valid_rows=1)
    other = tmp_path / "docs.csv"
    other.write_text("text\nx\n")
    with pytest.raises(ValueError, match="unsupported data file .*docs.csv"):
        build_data(tok, ["enwiki"], str(other), seq_len=16, train_rows=4, valid_rows=1)
    with pytest.raises(FileNotFoundError, match="data path .*absent.jsonl does not exist"):
        build_data(tok, ["enwiki"], str(tmp_path / "absent.jsonl"), seq_len=16, train_rows=4, valid_rows=1)


@pytest.mark.real
def test_default_enwiki_corpus_with_the_gemma_tokenizer(gemma, data_dir):
    _, tokenizer = gemma
    data = build_data(tokenizer, ["enwiki"], str(data_dir), seq_len=128, train_rows=8, valid_rows=2)
    assert data.train.shape == (8, 129)
    text = tokenizer.decode(real_tokens(data.train[0]))
    assert len(text) > 200
    # validation comes from enwiki/valid.jsonl, not from the training file
    first_valid = json.loads((data_dir / "enwiki" / "valid.jsonl").open().readline())["text"]
    assert tokenizer.decode(data.valid[0, 1:20].tolist()) in first_valid


@pytest.mark.real
def test_rows_per_doc_spreads_a_small_budget_over_many_real_documents(gemma, data_dir):
    """The study's 800 rows of enwiki + ELTeC come from 16 documents whole, from 400 or more at rows_per_doc=2."""
    _, tokenizer = gemma
    starts = set()  # the first 8 tokens of each of the first 300 documents of both corpora
    for name in ("enwiki", "eltec_eng"):
        with open(data_dir / name / "train.jsonl", encoding="utf-8") as handle:
            for _, line in zip(range(300), handle):
                starts.add(tuple(tokenizer(json.loads(line)["text"][:200], add_special_tokens=False)["input_ids"][:8]))

    def documents(rows_per_doc: int | None) -> int:
        data = build_data(tokenizer, ["enwiki", "eltec_eng"], str(data_dir), seq_len=128, train_rows=800,
                          valid_rows=1, rows_per_doc=rows_per_doc)
        assert data.train.shape == (800, 129) and (data.train[:, 0] == tokenizer.bos_token_id).all()
        return sum(tuple(row[1:9].tolist()) in starts for row in data.train)

    assert documents(None) == 16
    assert documents(2) >= 400  # at most 2 rows each (a one-row document gives one)
