"""The `loopus` lm-eval model: registration, and equality with lm-eval's `hf` model at num_loops=1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from lm_eval.api.instance import Instance

from eval_fixtures import GEMMA_DIR, make_tiny_checkpoints

import loopus
from loopus.eval.lm_eval_model import LoopUSLM

CONTEXTS = [
    "Question: Which gas do plants take in from the air?\nAnswer:",
    "The capital of France is",
    "Once upon a time there was a little",
]
CONTINUATIONS = [" carbon dioxide", " oxygen", " nitrogen and helium", " Paris", " London", " girl", " dog who lived"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


def _ll_requests() -> list[Instance]:
    reqs = []
    for ci, ctx in enumerate(CONTEXTS):
        for cont in CONTINUATIONS:
            reqs.append(Instance("loglikelihood", {}, (ctx, cont), len(reqs)))
    # one continuation longer than the full-row limit (scored chunk-wise)
    long_text = " ".join(f"word{i}" for i in range(100))  # ~300 tokens
    reqs.append(Instance("loglikelihood", {}, ("Start:", " " + long_text), len(reqs)))
    return reqs


def _pair(tiny, **kwargs):
    from lm_eval.models.huggingface import HFLM

    base_dir, loop_dir = tiny
    hf = HFLM(pretrained=str(base_dir), dtype="float32", device="cpu", **kwargs)
    lp = LoopUSLM(pretrained=str(loop_dir), num_loops=1, dtype="float32", **kwargs)
    return hf, lp


def test_loglikelihood_equals_hf_at_one_loop(tiny):
    hf, lp = _pair(tiny, batch_size=3)
    lp.lm_head_chunk = 64  # several lm_head chunks per row
    reqs = _ll_requests()
    want = hf.loglikelihood(reqs)
    got = lp.loglikelihood(reqs)
    assert len(got) == len(want) == len(reqs)
    # Equal up to float rounding, not bit for bit by design: the adapter applies lm_head to the
    # continuation positions only, in chunks, i.e. matmuls of other shapes that BLAS may sum in another order.
    for (a, ga), (b, gb) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4)
        assert ga == gb
    # every scored token ran exactly one loop pass
    assert lp.mean_loop_passes == 1.0


def test_rolling_equals_hf_disjoint_windows(tiny):
    hf, lp = _pair(tiny, batch_size=2, max_length=32)
    text = "The quick brown fox jumps over the lazy dog. " * 12
    reqs = [Instance("loglikelihood_rolling", {}, (text,), 0), Instance("loglikelihood_rolling", {}, ("Short text.",), 1)]
    want = hf.loglikelihood_rolling(reqs)
    got = lp.loglikelihood_rolling(reqs)
    assert got == pytest.approx(want, rel=1e-5)  # lm_head in chunks, as above


def test_max_length_comes_from_the_base_config(tiny):
    hf, lp = _pair(tiny)
    assert lp.max_length == hf.max_length == 512


def test_generate_until_equals_hf_at_one_loop(tiny):
    hf, lp = _pair(tiny, batch_size=2)
    reqs = [
        Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}), i)
        for i, c in enumerate(CONTEXTS)
    ]
    assert lp.generate_until(reqs) == hf.generate_until(reqs)


def test_num_loops_is_a_model_arg(tiny):
    _, loop_dir = tiny
    one = LoopUSLM(pretrained=str(loop_dir), num_loops=1)
    three = LoopUSLM(pretrained=str(loop_dir), num_loops=3)
    reqs = _ll_requests()[:4]
    a, b = one.loglikelihood(reqs), three.loglikelihood(reqs)
    assert any(abs(x[0] - y[0]) > 1e-3 for x, y in zip(a, b))
    assert three.mean_loop_passes == 3.0


def test_exit_args_are_passed_or_refused(tiny):
    _, loop_dir = tiny
    with pytest.raises(ValueError, match="exit_threshold for 'threshold' is a probability"):
        LoopUSLM(pretrained=str(loop_dir), num_loops=4, exit_strategy="threshold", exit_threshold=2.0)
    lm = LoopUSLM(pretrained=str(loop_dir), num_loops=4, exit_strategy="threshold", exit_threshold=1e-6, min_loops=1)
    lm.loglikelihood(_ll_requests()[:3])
    # a threshold near 0 lets every token stop after min_loops: fewer passes than the fixed budget
    assert lm.mean_loop_passes is not None and lm.mean_loop_passes < 4


@pytest.mark.parametrize("task, limit", [("arc_easy", 8), ("lambada_openai", 6), ("wikitext", 1)])
def test_exit_rule_that_never_fires_gives_the_fixed_budget_metrics(tiny, data_dir, monkeypatch, task, limit):
    """Through lm-eval (`evaluate_loopus`: one model, fixed point then exit point), an exit rule that can't
    fire computes exactly the fixed budget, on multiple choice, lambada and rolling perplexity.

    min_loops == num_loops can't fire whatever the weights: the model tests the rule only after passes
    n < num_loops, and the tracker returns no decision while n < min_loops. The exit point still takes
    the exit path (exit kwargs, prefill_exit, the padding mask in padded batches of 4).
    """
    from loopus.eval.harness import evaluate_loopus

    monkeypatch.setenv("LOOPUS_DATA", str(data_dir))
    _, loop_dir = tiny
    report = evaluate_loopus(
        str(loop_dir), [task], num_loops=[4], limit=limit, exit_strategy="threshold", thresholds=[0.9],
        min_loops=4, batch_size=4, device="cpu", bootstrap_iters=0,
    )
    fixed, exited = report["points"]
    assert fixed["label"] == "fixed 4" and exited["label"] == "t=0.9"
    assert fixed["metrics"][task]  # the task produced metrics
    assert exited["metrics"] == fixed["metrics"]  # exactly, not approximately
    assert fixed["mean_loop_passes"] == exited["mean_loop_passes"] == 4.0


def test_reset_starts_a_new_sweep_point(tiny):
    """`reset` sets the budget and exit settings and restarts the loop-pass count, checking them at once."""
    _, loop_dir = tiny
    lm = LoopUSLM(pretrained=str(loop_dir), num_loops=3)
    reqs = _ll_requests()[:2]
    lm.loglikelihood(reqs)
    assert lm.mean_loop_passes == 3.0
    lm.reset(2)
    assert (lm.num_loops, lm.mean_loop_passes, lm.exit_kwargs) == (2, None, {})
    lm.loglikelihood(reqs)
    assert lm.mean_loop_passes == 2.0
    lm.reset(4, exit_strategy="kl", min_loops=4)
    assert lm.exit_kwargs == {"exit_strategy": "kl", "min_loops": 4}
    with pytest.raises(ValueError, match="unknown exit_strategy 'median'"):
        lm.reset(4, exit_strategy="median")
    with pytest.raises(ValueError, match="num_loops must be an integer"):
        lm.reset(2.5)


def test_evaluate_loopus_reads_the_data_directory_it_is_given(tiny, data_dir, monkeypatch):
    """The data directory reaches the offline tasks as lm-eval task metadata: `$LOOPUS_DATA` may point
    elsewhere (or be unset) and is never written."""
    from loopus.eval.harness import evaluate_loopus

    monkeypatch.setenv("LOOPUS_DATA", "/no/such/loopus/data")
    _, loop_dir = tiny
    report = evaluate_loopus(str(loop_dir), ["arc_easy"], num_loops=[1], limit=2, batch_size=2, device="cpu",
                             data=data_dir, bootstrap_iters=0)
    assert report["loops"][1]["arc_easy"]
    import os

    assert os.environ["LOOPUS_DATA"] == "/no/such/loopus/data"


def test_an_exit_strategy_without_thresholds_runs_at_its_default_threshold(tiny, data_dir):
    from loopus.eval.harness import evaluate_loopus
    from loopus.halting import DEFAULT_THRESHOLDS

    _, loop_dir = tiny
    report = evaluate_loopus(str(loop_dir), ["arc_easy"], num_loops=[3], limit=2, exit_strategy="kl",
                             batch_size=2, device="cpu", data=data_dir, bootstrap_iters=0)
    fixed, exited = report["points"]
    assert exited["threshold"] == DEFAULT_THRESHOLDS["kl"] and exited["label"] == "t=0.01"
    assert fixed["mean_loop_passes"] == 3.0 and exited["mean_loop_passes"] <= 3.0


def test_base_checkpoint_is_refused(tiny):
    base_dir, _ = tiny
    with pytest.raises(ValueError, match="--model hf"):
        LoopUSLM(pretrained=str(base_dir))


def test_simple_evaluate_by_name_after_importing_the_adapter(tiny, tmp_path, monkeypatch):
    """`simple_evaluate(model="loopus")` in a fresh interpreter, after `import loopus.eval.lm_eval_model`,
    scores exactly as the adapter built here does."""
    from lm_eval import simple_evaluate

    from eval_fixtures import write_winogrande
    from loopus.eval import task_manager

    write_winogrande(tmp_path)
    monkeypatch.setenv("LOOPUS_DATA", str(tmp_path))
    _, loop_dir = tiny
    code = (
        "import json, loopus.eval.lm_eval_model, lm_eval\n"
        "from loopus.eval import task_manager\n"
        f"r = lm_eval.simple_evaluate(model='loopus', model_args='pretrained={loop_dir},num_loops=2',"
        " tasks=['winogrande'], task_manager=task_manager(include_defaults=False))\n"
        "print(json.dumps({'model': r['config']['model'], 'samples': r['n-samples']['winogrande'],"
        " 'acc': r['results']['winogrande']['acc,none']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    by_name = json.loads(out.stdout.strip().splitlines()[-1])
    assert by_name["model"] == "loopus" and by_name["samples"] == {"original": 4, "effective": 4}
    direct = simple_evaluate(model=LoopUSLM(pretrained=str(loop_dir), num_loops=2), tasks=["winogrande"],
                             task_manager=task_manager(include_defaults=False))
    assert by_name["acc"] == direct["results"]["winogrande"]["acc,none"]
    assert by_name["acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # a share of the 4 sentences


def test_register_lm_eval_is_lazy():
    """Registering puts a placeholder in lm-eval's registry; the adapter module is imported on first use."""
    code = (
        "import sys, loopus, loopus.eval\n"
        "loopus.eval.register_lm_eval()\n"
        "assert 'loopus.eval.lm_eval_model' not in sys.modules\n"
        "from lm_eval.api.registry import get_model\n"
        "assert get_model('loopus').__name__ == 'LoopUSLM'\n"
        "assert get_model('hf').__name__ == 'HFLM'\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def test_import_loopus_registers_the_model():
    code = "import loopus\nfrom lm_eval.api.registry import get_model\nprint(get_model('loopus').__name__)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "LoopUSLM" in out.stdout, out.stderr[-2000:]


@pytest.mark.real
def test_real_gemma_loopus_one_loop_equals_hf(gemma):
    """The real Gemma 3 270M: `hf` on the base vs `loopus` (converted, num_loops=1) on ARC-style requests."""
    from lm_eval.models.huggingface import HFLM

    base, tok = gemma
    hf = HFLM(pretrained=base, tokenizer=tok, batch_size=4, device="cpu")
    lp = LoopUSLM(pretrained=loopus.convert(base, 2, 1), tokenizer=tok, num_loops=1, batch_size=4)
    reqs = [Instance("loglikelihood", {}, (CONTEXTS[0], c), i) for i, c in enumerate(CONTINUATIONS[:3])]
    reqs.append(Instance("loglikelihood", {}, (CONTEXTS[1], " Paris"), 3))
    want, got = hf.loglikelihood(reqs), lp.loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(got, want):  # lm_head in chunks, as in the tiny-model test (262k-wide rows here)
        assert a == pytest.approx(b, rel=1e-4, abs=1e-3)
        assert ga == gb
