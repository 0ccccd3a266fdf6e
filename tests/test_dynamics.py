"""Split selection from staged representation dynamics: synthetic curves, the analyze/convert commands, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import char_tokenizer, tiny_base

import loopus
from loopus import SplitError
from loopus.cli import main
from loopus.dynamics import analyze, calibration_text, convert_auto, measure_dynamics
from loopus.split import SplitConstraints, change_score, choose_split, load_split

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def save_tiny_base(path, family="gemma3_text", layers=None):
    """A tiny random base model plus a tokenizer, saved as a checkpoint directory."""
    base = tiny_base(family)
    if layers is not None:
        from conftest import TINY_CONFIGS
        from transformers import AutoModelForCausalLM

        config = TINY_CONFIGS[family]()
        config.num_hidden_layers = layers
        if hasattr(config, "layer_types") and config.layer_types is not None:
            config.layer_types = config.layer_types[:layers]
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config).eval()
    base.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def write_calibration(path, n=40):
    sentences = [f"The {i}th river runs north of the old town, past {i * 3} mills and a bridge." for i in range(n)]
    path.write_text("\n".join(json.dumps({"text": s}) for s in sentences) + "\n")
    return path


# -- the algorithm on synthetic curves ---------------------------------------------------------------


def synthetic_metrics(num_layers, encoder, decoder, seed=0, noise=0.15):
    """Curves with three stages: big changes in the first `encoder` and last `decoder` layers, a plateau between."""
    rng = np.random.default_rng(seed)
    level = np.full(num_layers, 0.05)
    level[:encoder] = 0.6
    level[num_layers - decoder :] = 0.4
    jitter = np.exp(rng.normal(0, noise, size=(4, num_layers)))
    return {
        "cka": (1 - level * jitter[0]).tolist(),
        "cosine": np.cos(np.radians(60 * level * jitter[1])).tolist(),
        "relative_update": (level * jitter[2]).tolist(),
        "lens_step_kl": (2 * level * jitter[3]).tolist(),
    }


@pytest.mark.parametrize(
    "num_layers, encoder, decoder",
    [(18, 4, 3), (18, 2, 1), (12, 3, 2), (24, 5, 4), (28, 2, 6), (36, 6, 2)],
)
@pytest.mark.parametrize("signals", [None, ("angle", "relative_update", "lens_step_kl"), ("cka", "relative_update")])
def test_synthetic_stage_boundaries_are_found(num_layers, encoder, decoder, signals):
    for seed in range(3):
        metrics = synthetic_metrics(num_layers, encoder, decoder, seed=seed)
        choice = choose_split(metrics, SplitConstraints(min_reasoning=0.3), signals=signals)
        assert (choice.encoder_layers, choice.decoder_layers) == (encoder, decoder), (seed, choice.reasons)
        assert choice.reasoning_layers == (encoder, num_layers - decoder - 1)


def test_constraints_move_the_split_and_are_respected():
    metrics = synthetic_metrics(18, 6, 5)
    free = choose_split(metrics, SplitConstraints(min_reasoning=0.3))
    assert (free.encoder_layers, free.decoder_layers) == (6, 5)
    tight = choose_split(metrics, SplitConstraints(min_reasoning=12, max_encoder=4))
    assert tight.encoder_layers <= 4
    assert 18 - tight.encoder_layers - tight.decoder_layers >= 12
    floor = choose_split(metrics, SplitConstraints(min_encoder=7, min_decoder=6, min_reasoning=3))
    assert floor.encoder_layers >= 7 and floor.decoder_layers >= 6


def test_no_plateau_is_reported_not_hidden():
    ramp = {"relative_update": np.linspace(0.1, 1.0, 12).tolist()}
    choice = choose_split(ramp, SplitConstraints(min_reasoning=0.3))
    assert any("no plateau" in reason for reason in choice.reasons)
    assert choice.encoder_layers >= 1 and choice.decoder_layers >= 1


# Consecutive-layer linear CKA of Gemma 3 270M measured on 1024 tokens of enwiki/valid.jsonl.
GEMMA_CKA = [0.212, 0.102, 0.42, 0.253, 0.45, 0.849, 0.936, 0.957, 0.964, 0.978, 0.93, 0.933, 0.94, 0.921,
             0.891, 0.874, 0.749, 0.68]


def test_near_ties_keep_transitional_layers_out_of_the_loop():
    choice = choose_split({"cka": GEMMA_CKA})
    # layers 14 and 15 sit half-way between the plateau and the decoder: d = 2, 3, 4 fit within 2%
    assert (choice.encoder_layers, choice.decoder_layers) == (5, 4)
    assert any("kept out of the loop" in reason and "(5, 2), (5, 3), (5, 4)" in reason for reason in choice.reasons)


def test_change_score_is_scale_free_and_oriented():
    metrics = synthetic_metrics(12, 3, 2)
    scaled = dict(metrics, relative_update=(np.asarray(metrics["relative_update"]) * 1000).tolist())
    signals = ("relative_update",)
    np.testing.assert_allclose(change_score(metrics, signals), change_score(scaled, signals))
    score = change_score(metrics)
    assert score[:3].mean() > score[3:10].mean() < score[10:].mean()


@pytest.mark.parametrize(
    "layers, constraints, message",
    [
        (2, SplitConstraints(), "at least 3 layers are needed"),
        (6, SplitConstraints(min_encoder=3, min_decoder=2, min_reasoning=3), "constraints cannot be met"),
        (18, SplitConstraints(min_reasoning=0.9), "constraints cannot be met"),
        (18, SplitConstraints(min_encoder=4, max_encoder=2), "max_encoder/max_decoder is below its minimum"),
    ],
)
def test_impossible_splits_have_clear_messages(layers, constraints, message):
    with pytest.raises(SplitError, match=message):
        choose_split({"relative_update": [1.0] * layers}, constraints)


def test_unknown_signal_is_named():
    with pytest.raises(ValueError, match="unknown change signal.*'entropy'"):
        choose_split(synthetic_metrics(12, 3, 2), signals=("entropy",))


# -- measuring a real (tiny) model -------------------------------------------------------------------


def test_measured_signals_are_consistent():
    base = tiny_base("llama")
    torch.manual_seed(0)
    windows = torch.randint(3, 97, (3, 40)).tolist()
    metrics = measure_dynamics(base, windows, lens_tokens=50, progress=False)
    L = base.config.num_hidden_layers
    for name in ("cosine", "relative_update", "cka", "lens_kl", "lens_step_kl", "lens_top1"):
        assert len(metrics[name]) == L, name
    assert all(-1 <= c <= 1 for c in metrics["cosine"])
    assert all(0 <= c <= 1 + 1e-6 for c in metrics["cka"])
    assert metrics["lens_kl"][-1] == pytest.approx(0, abs=1e-4)  # the last layer's lens is the output
    assert metrics["lens_top1"][-1] == 1.0
    matrix = np.asarray(metrics["cka_matrix"])
    assert matrix.shape == (L + 1, L + 1)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.diag(matrix, 1), metrics["cka"], atol=1e-4)
    assert metrics["tokens"] == 3 * 39  # the first position of each window is left out
    assert metrics["lens_tokens"] <= 50


def test_empty_calibration_data_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        calibration_text(tmp_path, "empty.jsonl")
    (tmp_path / "blank.txt").write_text("   \n")
    with pytest.raises(ValueError, match="empty"):
        calibration_text(tmp_path, "blank.txt")
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(ValueError, match="has no 'text' field"):
        calibration_text(tmp_path, "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="calibration file missing.jsonl not found"):
        calibration_text(tmp_path, "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="no calibration text"):
        calibration_text(tmp_path)
    with pytest.raises(ValueError, match="no window has a token"):
        measure_dynamics(tiny_base("llama"), [[1]], progress=False)


def test_default_calibration_is_held_out_wikipedia(data_dir):
    text, source = calibration_text(data_dir, max_chars=2000)
    assert source.endswith("enwiki/valid.jsonl")
    assert len(text) >= 2000


def test_analyze_command_writes_split_and_plot(tmp_path, capsys):
    model_dir = save_tiny_base(tmp_path / "base")
    calib = write_calibration(tmp_path / "calib.jsonl")
    out = tmp_path / "analysis"
    code = main(["analyze", str(model_dir), "--data", str(tmp_path), "--calibration", "calib.jsonl",
                 "--tokens", "300", "--window", "64", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "split.json").read_text())
    split = result["split"]
    L = result["num_layers"]
    assert L == 6
    assert split["encoder_layers"] >= 1 and split["decoder_layers"] >= 1
    assert L - split["encoder_layers"] - split["decoder_layers"] >= 3  # default: half the layers loop
    assert split["reasoning_layers"] == [split["encoder_layers"], L - split["decoder_layers"] - 1]
    assert result["reasons"] and all(isinstance(r, str) for r in result["reasons"])
    assert result["calibration"]["tokens"] == 300
    assert result["calibration"]["source"].endswith("calib.jsonl")
    for name in ("cosine", "relative_update", "cka", "lens_kl", "lens_step_kl", "lens_top1"):
        assert len(result["metrics"][name]) == L
    assert len(result["change_score"]) == L
    assert (out / "dynamics.png").read_bytes()[:8] == PNG_MAGIC
    assert load_split(out) == (split["encoder_layers"], split["decoder_layers"])
    assert "loopus convert" in capsys.readouterr().out


def test_analyze_reads_a_data_file_as_the_calibration_text(tmp_path, capsys):
    """`loopus analyze --data FILE.jsonl` (or .txt): that file is the calibration text."""
    model_dir = save_tiny_base(tmp_path / "base")
    calib = write_calibration(tmp_path / "calib.jsonl")
    out = tmp_path / "analysis"
    code = main(["analyze", str(model_dir), "--data", str(calib), "--tokens", "300", "--window", "64",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "split.json").read_text())
    assert result["calibration"]["source"] == str(calib) and result["calibration"]["tokens"] == 300

    plain = tmp_path / "plain.txt"
    plain.write_text("A river runs north past the mills.\n\nThe bridge is old.\n")
    text, source = calibration_text(plain)
    assert source == str(plain) and text.startswith("A river runs north") and "The bridge is old." in text
    # a relative --calibration is looked for next to the data file
    text, source = calibration_text(plain, "calib.jsonl", max_chars=100)
    assert source == str(calib) and text.startswith("The 0th river")
    with pytest.raises(FileNotFoundError, match="data path .*absent.jsonl does not exist"):
        calibration_text(tmp_path / "absent.jsonl")


@pytest.mark.parametrize(
    "argv_extra, message",
    [
        (["--calibration", "empty.jsonl"], "is empty"),
        (["--calibration", "nope.txt"], "calibration file nope.txt not found"),
        (["--min-encoder", "3", "--min-decoder", "3"], "constraints cannot be met"),
        (["--min-reasoning", "0"], "--min-reasoning must be > 0"),
    ],
)
def test_analyze_bad_input_is_one_clear_line(tmp_path, capsys, argv_extra, message):
    model_dir = save_tiny_base(tmp_path / "base")
    (tmp_path / "empty.jsonl").write_text("")
    code = main(["analyze", str(model_dir), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--no-progress"] + argv_extra)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.strip().split("\n")[-1].startswith("loopus analyze: error:")
    assert "Traceback" not in err


def test_analyze_too_few_layers(tmp_path, capsys):
    model_dir = save_tiny_base(tmp_path / "base", family="llama", layers=2)
    write_calibration(tmp_path / "calib.jsonl")
    code = main(["analyze", str(model_dir), "--data", str(tmp_path), "--calibration", "calib.jsonl",
                 "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert "at least 3 layers are needed" in capsys.readouterr().err


# -- convert --split auto -------------------------------------------------------------------------------


def test_convert_split_auto_python_api(tmp_path):
    write_calibration(tmp_path / "calib.jsonl")
    base = tiny_base("qwen3")
    model = convert_auto(base, "auto", char_tokenizer(), data=tmp_path, calibration="calib.jsonl",
                         calibration_tokens=200)
    analysis = model.split_analysis
    assert (model.config.encoder_layers, model.config.decoder_layers) == (
        analysis["split"]["encoder_layers"], analysis["split"]["decoder_layers"])
    same = convert_auto(base, tokenizer=char_tokenizer(), data=tmp_path, calibration="calib.jsonl",
                        calibration_tokens=200)
    assert same.config.encoder_layers == model.config.encoder_layers
    assert convert_auto(base, (2, 1)).config.reasoning_range == range(2, 5)
    ids = torch.randint(3, 97, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids, num_loops=1).logits, base(ids).logits)


@pytest.mark.parametrize(
    "convert, kwargs, message",
    [
        ("convert", dict(encoder_layers="auto", decoder_layers=1), "loopus.dynamics.convert_auto"),
        ("convert", dict(encoder_layers="half", decoder_layers=1), "must be a layer count"),
        ("convert_auto", dict(split="auto"), "pass tokenizer="),
        ("convert_auto", dict(split=(1, 2, 3)), "split must be"),
        ("convert_auto", dict(split=7), "split must be"),
    ],
)
def test_convert_split_arguments_are_checked(convert, kwargs, message):
    build = loopus.convert if convert == "convert" else convert_auto
    with pytest.raises((SplitError, ValueError), match=message):
        build(tiny_base("llama"), **kwargs)


@pytest.mark.parametrize("split", [(2.7, 1), (2, 1.0), (True, 1)])
def test_a_fractional_split_pair_is_refused_not_truncated(split):
    with pytest.raises(SplitError, match="must be a layer count"):
        convert_auto(tiny_base("llama"), split)


def test_convert_command_split_auto_and_split_file(tmp_path, capsys):
    model_dir = save_tiny_base(tmp_path / "base")
    write_calibration(tmp_path / "calib.jsonl")
    out = tmp_path / "looped"
    code = main(["convert", str(model_dir), "--split", "auto", "--data", str(tmp_path), "--calibration",
                 "calib.jsonl", "--tokens", "200", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    assert (saved["encoder_layers"], saved["decoder_layers"]) == load_split(out / "split.json")
    assert (out / "dynamics.png").read_bytes()[:8] == PNG_MAGIC
    # a split.json from an earlier analysis, and explicit E,D counts
    code = main(["convert", str(model_dir), "--split", str(out / "split.json"), "--out", str(tmp_path / "b")])
    assert code == 0
    code = main(["convert", str(model_dir), "--split", "1,2", "--out", str(tmp_path / "c")])
    assert code == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["decoder_layers"] == 2
    capsys.readouterr()
    code = main(["convert", str(model_dir), "--out", str(tmp_path / "d")])
    assert code == 2 and "--split auto" in capsys.readouterr().err
    code = main(["convert", str(model_dir), "--split", str(tmp_path / "none.json"), "--out", str(tmp_path / "e")])
    assert code == 2 and "not found" in capsys.readouterr().err


# -- the real model ------------------------------------------------------------------------------------


@pytest.mark.real
def test_analyze_real_gemma_gives_a_valid_split(gemma, data_dir, tmp_path):
    base, tokenizer = gemma
    result = analyze(base, tokenizer, data=data_dir, tokens=320, window=160, lens_tokens=16, out=tmp_path,
                     progress=False, name="gemma-3-270m")
    split = result["split"]
    e, d = split["encoder_layers"], split["decoder_layers"]
    assert result["num_layers"] == 18
    assert e >= 1 and d >= 1 and 18 - e - d >= 9
    # Gemma 3 270M's first two layers rewrite the embeddings wholesale: they are never looped
    assert e >= 2
    assert result["metrics"]["cosine"][0] < 0.5
    assert (tmp_path / "dynamics.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "split.json").read_text())["split"] == split
