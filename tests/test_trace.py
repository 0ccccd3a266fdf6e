"""Loop-trajectory analysis: `trace_loops` on tiny models, the `loopus trace` command, bad input, real Gemma."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import char_tokenizer, tiny_base
from test_dynamics import PNG_MAGIC, save_tiny_base

import loopus
from loopus.cli import main
from loopus.trace import thinking_html, thinking_table, trace_loops, write_trace


def test_trace_records_every_loop_and_position():
    base = tiny_base("llama")
    model = loopus.convert(base, 2, 1)
    ids = torch.randint(3, 97, (9,))
    trace = trace_loops(model, input_ids=ids, num_loops=4, top_k=2)
    seq, loops = 9, 4
    coords = np.asarray(trace["pca"]["coords"])
    assert coords.shape == (loops + 1, seq, 2)  # h_0 (encoder output) and every loop
    assert np.asarray(trace["gate_mean_coefficient"]).shape == (loops, seq)
    assert trace["gate_mean_coefficient"][0] == [1.0] * seq  # the first pass is not gated
    gates = np.asarray(trace["gate_mean_coefficient"][1:])
    assert ((gates > 0) & (gates < 1)).all()
    assert np.asarray(trace["relative_step"]).shape == (loops, seq)
    assert (np.asarray(trace["relative_step"]) >= 0).all()
    assert np.asarray(trace["confidence"]).shape == (loops, seq)
    assert len(trace["thinking_trace"]) == seq
    row = trace["thinking_trace"][3]
    assert len(row["next_token_by_loop"]) == loops and len(row["top_k_by_loop"][0]) == 2
    # loop 1 is the base model: its top token is the base model's prediction
    with torch.no_grad():
        expected = base(ids[None]).logits[0].argmax(-1).tolist()
    assert [r["top_k_by_loop"][0][0]["id"] for r in trace["thinking_trace"]] == expected
    assert trace["split"] == {"encoder_layers": 2, "decoder_layers": 1, "reasoning_layers": [2, 4]}
    assert sum(trace["pca"]["explained_variance_ratio"]) <= 1 + 1e-6


def test_trace_files_are_well_formed(tmp_path):
    model = loopus.convert(tiny_base("gemma3_text"), 1, 2)
    trace = trace_loops(model, char_tokenizer(), "Loops <think> & refine", num_loops=3)
    files = write_trace(trace, tmp_path)
    assert set(files) == {"json", "png", "html", "table"}
    loaded = json.loads((tmp_path / "trace.json").read_text())
    assert loaded["tokens"][0] == "<bos>" and loaded["num_loops"] == 3
    assert loaded["pca"]["fitted_from_position"] == 1  # BOS is left out of the PCA fit
    assert (tmp_path / "trace.png").read_bytes()[:8] == PNG_MAGIC
    page = (tmp_path / "trace.html").read_text()
    assert page.count("<tr>") == len(trace["tokens"]) + 1
    assert "<think>" not in page  # the prompt and its tokens are escaped
    assert "<code>Loops &lt;think&gt; &amp; refine</code>" in page
    assert all(f"<th>{token}</th>" in page for token in ("&lt;", "&gt;", "&amp;"))
    table = thinking_table(trace)
    assert table.splitlines()[0].split()[:3] == ["pos", "token", "loop"]
    assert len(table.splitlines()) == len(trace["tokens"]) + 2
    assert "<table>" in thinking_html(trace)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="   "), "prompt is empty"),
        (dict(prompt="hi", num_loops=0), "num_loops must be >= 1"),
        (dict(input_ids=[]), "input_ids is empty"),
        (dict(input_ids=[5, 500]), "token ids must lie in 0..96"),
        (dict(), "exactly one of prompt or input_ids"),
    ],
)
def test_trace_bad_input(kwargs, message):
    model = loopus.convert(tiny_base("llama"), 1, 1)
    with pytest.raises(ValueError, match=message):
        trace_loops(model, char_tokenizer(), **kwargs)


def test_trace_command_on_checkpoint_and_on_base_with_split(tmp_path, capsys):
    base_dir = save_tiny_base(tmp_path / "base")
    looped = tmp_path / "looped"
    assert main(["convert", str(base_dir), "--encoder-layers", "2", "--decoder-layers", "1",
                 "--out", str(looped)]) == 0
    out = tmp_path / "trace"
    code = main(["trace", str(looped), "--prompt", "The river", "--num-loops", "3", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "loop 3" in captured.out  # the thinking-trace table is printed
    for name in ("trace.json", "trace.png", "trace.html", "thinking_trace.txt"):
        assert (out / name).stat().st_size > 0
    trace = json.loads((out / "trace.json").read_text())
    assert trace["split"]["encoder_layers"] == 2 and len(trace["relative_step"]) == 3
    code = main(["trace", str(base_dir), "--split", "1,2", "--prompt", "Hi", "--num-loops", "2",
                 "--out", str(tmp_path / "t2"), "--quiet"])
    assert code == 0
    assert json.loads((tmp_path / "t2" / "trace.json").read_text())["split"]["decoder_layers"] == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{base}", "--prompt", "x"], "is not a LoopUS checkpoint: give a split"),
        (["{base}", "--prompt", "x", "--encoder-layers", "2"], "give both --encoder-layers and --decoder-layers"),
        (["{base}", "--prompt", "x", "--split", "5,1"], "at least 1 layer"),
        (["{base}", "--prompt", "x", "--split", "1,1", "--num-loops", "0"], "--num-loops must be >= 1"),
        (["{missing}", "--prompt", "x"], "does not exist"),
    ],
)
def test_trace_command_bad_input(tmp_path, capsys, argv, message):
    base_dir = save_tiny_base(tmp_path / "base")
    argv = [a.format(base=base_dir, missing=tmp_path / "missing") for a in argv]
    code = main(["trace"] + argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.strip().split("\n")[-1].startswith("loopus trace: error:")


@pytest.mark.real
def test_trace_real_gemma(gemma, tmp_path):
    base, tokenizer = gemma
    model = loopus.convert(base, 4, 4)
    trace = trace_loops(model, tokenizer, "The capital of France is", num_loops=3)
    # loop 1 is the base model
    ids = torch.tensor([trace["input_ids"]])
    with torch.no_grad():
        expected = base(ids).logits[0].argmax(-1).tolist()
    assert [r["top_k_by_loop"][0][0]["id"] for r in trace["thinking_trace"]] == expected
    assert [len(r["next_token_by_loop"]) for r in trace["thinking_trace"]] == [3] * len(expected)
    files = write_trace(trace, tmp_path)
    assert (tmp_path / "trace.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "trace.json").read_text())["tokens"][-1].strip() == "is"
    assert files["html"].endswith("trace.html")
