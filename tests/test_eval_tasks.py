"""The offline lm-eval tasks shipped with loopus: they read the data directory and build lm-eval's prompts."""

from __future__ import annotations

import pytest

from eval_fixtures import write_openbookqa, write_winogrande

from loopus.eval import task_manager
from loopus.eval.tasks.utils import load_hellaswag, load_mmlu, wikitext_pages


@pytest.fixture(scope="module")
def tm(data_dir):
    """The shipped tasks, reading `data_dir` while this module's tests run (the setting is restored after)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOOPUS_DATA", str(data_dir))
        yield task_manager(include_defaults=False)


def _load(tm, name):
    return tm.load([name])["tasks"][name]


EXPECTED = {  # task: (number of eval docs, first prompt, first target)
    "arc_easy": (2376, "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:", 0),
    "arc_challenge": (1172, "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect of this increase in rotation?\nAnswer:", 2),
    "piqa": (1838, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", 0),
    "hellaswag": (10042, "Roof shingle removal: A man is sitting on a roof. he", 3),
    "lambada_openai": (5153, None, " signs"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_task_reads_the_data_dir(tm, name):
    task = _load(tm, name)
    docs = list(task.eval_docs)
    count, prompt, target = EXPECTED[name]
    assert len(docs) == count
    if prompt is not None:
        assert task.doc_to_text(docs[0]) == prompt
    assert task.doc_to_target(docs[0]) == target


def test_wikitext_is_document_level(tm, data_dir):
    pages = wikitext_pages((data_dir / "wikitext2" / "wiki.test.raw").read_text())
    assert len(pages) == 62 and pages[0].startswith(" = Robert Boulter =")
    task = _load(tm, "wikitext")
    assert task.OUTPUT_TYPE == "loglikelihood_rolling"
    doc = next(iter(task.eval_docs))
    # lm-eval's detokenizer: " @-@ " -> "-"
    assert " @-@ " in doc["page"] and " @-@ " not in task.doc_to_target(doc)
    assert [m["metric"] for m in task.config.metric_list] == ["word_perplexity", "byte_perplexity", "bits_per_byte"]


def test_mmlu_subject_and_group(tm, data_dir):
    ds = load_mmlu("anatomy", data_dir=str(data_dir))
    assert len(ds["test"]) == 135 and len(ds["dev"]) == 5
    task = _load(tm, "mmlu_anatomy")
    doc = next(iter(task.eval_docs))
    assert task.doc_to_text(doc).endswith("\nD. " + doc["choices"][3] + "\nAnswer:")
    assert task.config.description.startswith("The following are multiple choice questions (with answers) about anatomy.")
    assert "mmlu_anatomy" in tm.all_tasks and "mmlu" in tm.all_groups


def test_hellaswag_derived_format(data_dir):
    ds = load_hellaswag(data_dir=str(data_dir))["validation"]
    assert len(ds) == 10042 and all(len(c) == 4 for c in ds[:50]["choices"])
    assert not any("[" in q for q in ds[:500]["query"])


def test_winogrande_official_format(tmp_path, monkeypatch):
    write_winogrande(tmp_path)
    monkeypatch.setenv("LOOPUS_DATA", str(tmp_path))
    task = _load(task_manager(include_defaults=False), "winogrande")
    docs = list(task.eval_docs)
    assert len(docs) == 4
    # partial scoring: the context is the option-filled prefix, the target the rest of the sentence
    assert task.doc_to_choice(docs[1]) == ["The trophy doesn't fit into the brown suitcase because the trophy",
                                           "The trophy doesn't fit into the brown suitcase because the suitcase"]
    assert task.doc_to_target(docs[1]) == "is too large."
    assert task.doc_to_text(docs[3]) == 1  # answer "2"


def test_winogrande_labels_must_align(tmp_path):
    from loopus.eval.tasks.utils import load_winogrande

    write_winogrande(tmp_path, labels=["1", "2"])
    with pytest.raises(ValueError, match="labels"):
        load_winogrande(data_dir=str(tmp_path))
    write_winogrande(tmp_path, labels=["2", "2", "1", "1"])
    ds = load_winogrande(data_dir=str(tmp_path))["validation"]
    assert ds["answer"] == ["2", "2", "1", "1"]  # the labels file decides


def test_openbookqa_official_format(tmp_path, monkeypatch):
    write_openbookqa(tmp_path)
    monkeypatch.setenv("LOOPUS_DATA", str(tmp_path))
    task = _load(task_manager(include_defaults=False), "openbookqa")
    docs = list(task.eval_docs)
    assert len(docs) == 3
    assert task.doc_to_text(docs[0]) == "The sun is responsible for"
    assert task.doc_to_target(docs[0]) == 3 and task.doc_to_target(docs[2]) == 2
    assert task.doc_to_choice(docs[0])[3] == "plants sprouting, blooming and wilting"


def test_missing_data_names_the_file(tmp_path):
    from loopus.eval.tasks.utils import load_openbookqa, load_piqa

    with pytest.raises(FileNotFoundError, match="piqa/valid.jsonl"):
        load_piqa(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="openbookqa/test.jsonl"):
        load_openbookqa(data_dir=str(tmp_path))
