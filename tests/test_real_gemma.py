"""The same contracts on the real embedded Gemma 3 270M (cached safetensors conversion)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import loopus
from loopus.eval.perplexity import per_loop_perplexity

pytestmark = pytest.mark.real

PROMPTS = ["The capital of France is", "In 1905, Albert Einstein published four papers that", "Hi"]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_one_loop_equals_real_gemma(gemma, padding_side):
    base, tokenizer = gemma
    tokenizer.padding_side = padding_side
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = base(**batch).logits
        got = loopus.convert(base, 4, 2)(**batch, num_loops=1).logits
    keep = batch["attention_mask"].bool()
    assert torch.equal(got[keep], expected[keep])


def test_real_gemma_round_trip_keeps_head_tied(gemma, tmp_path):
    base, tokenizer = gemma
    model = loopus.convert(base, 2, 1, num_loops=2)
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "base.lm_head.weight" not in set(f.keys())
    # one 262k x 640 fp32 matrix, not two
    assert (tmp_path / "model.safetensors").stat().st_size < 1.2e9
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.base.lm_head.weight.data_ptr() == loaded.base.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_untrained_loop_perplexity_on_wikitext(gemma, data_dir):
    """At one loop the wrapper scores text exactly like the base; untrained extra loops hurt (the baseline)."""
    base, tokenizer = gemma
    text = (data_dir / "wikitext2" / "wiki.test.raw").read_text()
    model = loopus.convert(base, 2, 1)
    result = per_loop_perplexity(model, tokenizer, text, loops=(1, 2), max_tokens=256, window=128, progress=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:128]
    inputs = torch.tensor([[tokenizer.bos_token_id] + ids[:-1]])
    with torch.no_grad():
        base_nll = torch.nn.functional.cross_entropy(base(inputs).logits[0], torch.tensor(ids)).item()
    first_window = per_loop_perplexity(model, tokenizer, text, loops=(1,), max_tokens=128, window=128, progress=False)
    assert first_window[1]["nll"] == pytest.approx(base_nll, abs=1e-4)
    assert 5 < result[1]["ppl"] < 100
    assert result[2]["ppl"] > result[1]["ppl"]


def test_a_near_identity_gate_makes_every_loop_count_start_as_the_base(gemma, data_dir):
    """Function-preserving expansion: with a small gate share, 8 loops score real text within 0.5% of 1 loop."""
    base, tokenizer = gemma
    text = "\n\n".join(
        json.loads(line)["text"] for line in (data_dir / "enwiki" / "valid.jsonl").open().readlines()[:3]
    )
    preserving = loopus.convert(base, 6, 3, gate_init=0.005)
    result = per_loop_perplexity(preserving, tokenizer, text, loops=(1, 8), max_tokens=512, window=256, progress=False)
    assert abs(result[8]["ppl"] / result[1]["ppl"] - 1) < 0.005
    default = loopus.convert(base, 6, 3, gate_init=0.5)  # the paper's share drifts far at 8 loops
    drifting = per_loop_perplexity(default, tokenizer, text, loops=(8,), max_tokens=512, window=256, progress=False)
    assert drifting[8]["ppl"] > 1.5 * result[1]["ppl"]


def test_depth_adapters_leave_one_loop_exactly_the_base(gemma):
    """Depth-wise LoRA acts from loop 2 on: with adapters that change the model, one loop is still the base."""
    base, tokenizer = gemma
    base_copy = copy.deepcopy(base)  # convert shares (and here adapts) the base model's layers
    model = loopus.convert(base_copy, 6, 3, gate_init=0.02, depth_lora_rank=8).eval()
    batch = tokenizer(["The capital of France is", "A looped transformer"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = base(**batch).logits
        two_before = model(**batch, num_loops=2, use_cache=False).logits
        torch.manual_seed(0)
        for p in model.depth_adapter_parameters():
            p.normal_(std=0.05)
        assert torch.equal(model(**batch, num_loops=1, use_cache=False).logits, expected)
        two_after = model(**batch, num_loops=2, use_cache=False).logits
    mask = batch["attention_mask"].bool()
    assert (two_after - two_before)[mask].abs().max() > 1e-2


def test_the_embedded_tokenizer_starts_every_sequence_with_bos(gemma):
    # the GGUF says add_bos_token; transformers' conversion drops it and Gemma is lost without its BOS
    _, tokenizer = gemma
    ids = tokenizer(PROMPTS)["input_ids"]
    assert all(row[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in row[1:] for row in ids)
    assert tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"][0] != tokenizer.bos_token_id


def test_an_old_cache_without_the_bos_tokenizer_is_rebuilt(gemma, tmp_path, monkeypatch):
    import shutil

    from loopus import zoo

    # a cache from before the stamp: the current one without its stamp, and a tokenizer that adds no BOS
    old = tmp_path / "base" / "gemma-3-270m"
    shutil.copytree(zoo._embedded_checkpoint("gemma-3-270m"), old)
    (old / zoo.CACHE_STAMP).unlink()
    old_tokenizer = copy.deepcopy(gemma[1])  # a copy: the session's tokenizer stays as it is
    old_tokenizer.add_bos_token = False
    old_tokenizer.save_pretrained(old)
    monkeypatch.setenv("LOOPUS_CACHE", str(tmp_path))
    assert zoo._embedded_checkpoint("gemma-3-270m") == old and zoo._cache_format(old) == zoo.CACHE_FORMAT
    _, tokenizer = zoo.load_base("gemma-3-270m")
    assert tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id


def test_lm_eval_hf_scores_the_real_gemma_in_its_regime(gemma, data_dir, monkeypatch):
    # lm-eval's HFLM relies on the tokenizer's own BOS: without it LAMBADA perplexity was in the thousands.
    # The reference is the base model scored here by hand on the same passages, each led by BOS.
    from loopus.eval.harness import evaluate_hf

    model, tokenizer = gemma
    docs = [json.loads(line)["text"] for line in (data_dir / "lambada_openai" / "lambada_test.jsonl").open()][:10]
    logliks = []
    for text in docs:
        context, word = text.rsplit(" ", 1)
        whole = tokenizer(context + " " + word)["input_ids"]
        start = len(tokenizer(context)["input_ids"])
        assert whole[0] == tokenizer.bos_token_id
        with torch.no_grad():
            logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
        logliks.append(sum(logprobs[i - 1, whole[i]].item() for i in range(start, len(whole))))
    by_hand = torch.tensor(logliks).mean().neg().exp().item()
    monkeypatch.setenv("LOOPUS_DATA", str(data_dir))
    result = evaluate_hf("gemma-3-270m", ["lambada_openai"], limit=10)
    assert result["lambada_openai"]["perplexity"] == pytest.approx(by_hand, rel=1e-4)
