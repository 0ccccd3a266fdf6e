"""Bad input is refused in one line that names the problem and the file, never a traceback, silent garbage
or a default-size model: saved configs, corrupt weights, missing paths, bad data files, broken checkpoints."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from conftest import char_tokenizer, tiny_base
from transformers import AutoModelForCausalLM

import loopus
from loopus import CheckpointError, LoopUSConfig, LoopUSForCausalLM
from loopus.cli import main
from loopus.text import read_documents, read_jsonl_texts

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny LoopUS checkpoint and a tiny base checkpoint, each with a tokenizer."""
    root = tmp_path_factory.mktemp("saved")
    loopus.convert(tiny_base("llama"), 2, 1).save_pretrained(root / "loopus")
    tiny_base("llama").save_pretrained(root / "base")
    for name in ("loopus", "base"):
        char_tokenizer().save_pretrained(root / name)
    return root


def copy_of(saved, tmp_path, name: str = "loopus"):
    target = tmp_path / f"copy-{name}"
    shutil.copytree(saved / name, target)
    return target


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def cli_error(capsys, argv: list[str]) -> str:
    """Run `loopus ARGV`, require the refused-input exit code, return its one error line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def never_built(monkeypatch):
    """Make building a LoopUS model fail loudly: a refusal must come before any allocation."""

    def build(self, *args, **kwargs):
        raise AssertionError("a LoopUS model was built from a config that should have been refused")

    monkeypatch.setattr(LoopUSForCausalLM, "__init__", build)


# -- saved configs ---------------------------------------------------------------------------------


def test_a_config_without_base_config_is_refused_before_any_model_is_built(saved, tmp_path, monkeypatch, capsys):
    path = copy_of(saved, tmp_path)
    edit_config(path, base_config=None)
    never_built(monkeypatch)
    with pytest.raises(CheckpointError, match=f"{path}.*no base_config"):
        AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(CheckpointError, match=f"{path}.*no base_config"):
        LoopUSForCausalLM.from_pretrained(path)
    line = cli_error(capsys, ["generate", str(path), "hi", "--max-new-tokens", "1"])
    assert line.startswith("loopus generate: error: ") and str(path) in line and "no base_config" in line


def test_a_base_config_without_model_type_is_refused(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["base_config"]["model_type"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="base_config has no model_type"):
        AutoModelForCausalLM.from_pretrained(path)


def test_the_default_config_gives_defaults_but_builds_no_model():
    defaults = LoopUSConfig()
    assert defaults.base_config is None and defaults.num_loops == 4 and defaults.gate_rank == 64
    with pytest.raises(ValueError, match="no base_config"):
        LoopUSForCausalLM(defaults)


@pytest.mark.parametrize("field, value", [("encoder_layers", 9), ("decoder_layers", 6), ("encoder_layers", 5)])
def test_a_split_out_of_range_in_a_saved_config_is_refused_at_load(saved, tmp_path, monkeypatch, capsys, field, value):
    path = copy_of(saved, tmp_path)
    edit_config(path, **{field: value})
    never_built(monkeypatch)
    with pytest.raises(CheckpointError, match=f"{path}/config.json.*{field}"):
        AutoModelForCausalLM.from_pretrained(path)
    line = cli_error(capsys, ["generate", str(path), "hi", "--max-new-tokens", "1"])
    assert str(path) in line and "reasoning" in line


def test_a_split_out_of_range_is_refused_when_a_config_is_built():
    with pytest.raises(ValueError, match="leave no reasoning layer"):
        LoopUSConfig(base_config=tiny_base("llama").config, encoder_layers=4, decoder_layers=2)


# -- corrupt weights -------------------------------------------------------------------------------


def fill_data_with_ff(path):
    """Overwrite every tensor byte of a safetensors file with 0xFF (NaN in every float format), header intact."""
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 + header_len :] = b"\xff" * (len(data) - 8 - header_len)
    path.write_bytes(bytes(data))


def test_non_finite_weights_are_refused_at_load_naming_the_tensor(saved, tmp_path, capsys):
    path = copy_of(saved, tmp_path)
    fill_data_with_ff(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"non-finite values \(NaN or inf\) in base\.model\..*weight"):
        LoopUSForCausalLM.from_pretrained(path)
    with pytest.raises(CheckpointError, match="non-finite values"):
        AutoModelForCausalLM.from_pretrained(path)
    line = cli_error(capsys, ["generate", str(path), "hi", "--max-new-tokens", "1"])
    assert "non-finite values" in line and str(path) in line
    line = cli_error(capsys, ["eval", str(path), "--data", str(tmp_path), "--tasks", "openbookqa", "--loops", "1",
                              "--out", str(tmp_path / "o")])
    assert line.startswith("loopus eval: error: ") and "non-finite values" in line
    assert not (tmp_path / "o").exists()


def test_train_refuses_a_checkpoint_with_non_finite_weights(saved, tmp_path, capsys):
    path = copy_of(saved, tmp_path)
    fill_data_with_ff(path / "model.safetensors")
    line = cli_error(capsys, ["train", "--model", str(path), "--out", str(tmp_path / "run"), "--data", str(tmp_path),
                              "--max-steps", "1"])
    assert line.startswith("loopus train: error: ") and "non-finite values" in line


def test_a_base_model_with_non_finite_weights_is_refused(saved, tmp_path, capsys):
    path = copy_of(saved, tmp_path, "base")
    fill_data_with_ff(path / "model.safetensors")
    line = cli_error(capsys, ["generate", str(path), "hi", "--split", "1,1", "--max-new-tokens", "1"])
    assert "non-finite values" in line and str(path) in line


# -- missing or misnamed models --------------------------------------------------------------------


def test_generate_names_a_missing_path_and_a_file_given_as_a_model(tmp_path, capsys):
    line = cli_error(capsys, ["generate", str(tmp_path / "nowhere"), "hi"])
    assert line == f"loopus generate: error: model path {tmp_path / 'nowhere'} does not exist"
    (tmp_path / "notes.txt").write_text("not a model")
    line = cli_error(capsys, ["generate", str(tmp_path / "notes.txt"), "hi"])
    assert line == (f"loopus generate: error: {tmp_path / 'notes.txt'} is a file: pass the model directory that "
                    "holds config.json")


def test_a_deleted_config_json_is_named_by_generate_and_train(saved, tmp_path, capsys):
    path = copy_of(saved, tmp_path)
    (path / "config.json").unlink()
    problem = f"{path} has no config.json: not a saved model, or its config.json was deleted"
    assert cli_error(capsys, ["generate", str(path), "hi"]) == f"loopus generate: error: {problem}"
    line = cli_error(capsys, ["train", "--model", str(path), "--out", str(tmp_path / "run"), "--max-steps", "1"])
    assert line == f"loopus train: error: {problem}"


def test_train_names_a_missing_model_path(tmp_path, capsys):
    line = cli_error(capsys, ["train", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"),
                              "--max-steps", "1"])
    assert line == f"loopus train: error: base model path {tmp_path / 'nowhere'} does not exist"


def test_eval_names_a_missing_model_path(tmp_path, capsys):
    line = cli_error(capsys, ["eval", "./nope-no-such-model", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert line == "loopus eval: error: model path ./nope-no-such-model does not exist"


def test_eval_names_an_unknown_task_and_lists_the_shipped_ones(saved, tmp_path, capsys):
    line = cli_error(capsys, ["eval", str(saved / "loopus"), "--data", str(tmp_path), "--tasks", "nosuchtask",
                              "--out", str(tmp_path / "o")])
    assert "unknown lm-eval task(s) ['nosuchtask']" in line and "arc_easy" in line and "lm-eval ls tasks" in line
    assert not (tmp_path / "o").exists()


# -- data files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, problem", [
    ('{"text": 12345}', "has 'text': 12345 (int), not a string"),
    ('["a", "list"]', "is a list, not a JSON object"),
    ('"just a string with text"', "is a str, not a JSON object"),
])
def test_a_jsonl_line_of_the_wrong_shape_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2 ") + ".*" + re.escape(problem)):
        list(read_jsonl_texts(path, "text"))


def test_a_null_text_is_skipped_like_an_empty_one(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": null}\n{"text": ""}\n{"text": "kept"}\n')
    assert list(read_jsonl_texts(path, "text")) == ["kept"]


@pytest.mark.parametrize("name", ["corpus.txt", "corpus.jsonl"])
def test_a_binary_data_file_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary")
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is not UTF-8 text"):
        read_documents(path)


def test_train_names_a_binary_data_file(saved, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_bytes(b"\xff\xfe\x00 binary " * 64)
    line = cli_error(capsys, ["train", "--model", str(saved / "loopus"), "--out", str(tmp_path / "run"),
                              "--data", str(data), "--max-steps", "1", "--seq-len", "16", "--progress", "false",
                              "--tensorboard", "false"])
    assert line.startswith("loopus train: error: ") and f"{data} is not UTF-8 text" in line


# -- module structure ------------------------------------------------------------------------------


def test_evaluation_and_split_analysis_do_not_import_the_training_package():
    code = ("import sys, loopus.eval.perplexity, loopus.dynamics; "
            "assert not [m for m in sys.modules if m.startswith('loopus.train')], sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)



# -- training checkpoints --------------------------------------------------------------------------


def write_training_checkpoint(out, step: int, weight: float = 1.0):
    from loopus.train.checkpointing import finalize_checkpoint, prepare_staging

    prepare_staging(out, step)
    return finalize_checkpoint(out, step, {"w": torch.full((2, 2), weight)}, {"state": {}, "param_groups": []},
                               {"step": step})


def test_a_truncated_optimizer_state_is_refused_naming_it_and_the_older_checkpoint(tmp_path):
    from loopus.train.checkpointing import load_checkpoint

    older = write_training_checkpoint(tmp_path, 2)
    newer = write_training_checkpoint(tmp_path, 4)
    optimizer = newer / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=re.escape(f"{optimizer} is corrupt or truncated") + ".*"
                       + re.escape(f"delete {newer} to resume from {older}")):
        load_checkpoint(newer)
    assert load_checkpoint(older)["state"] == {"step": 2}


def test_a_corrupt_trainer_state_is_refused_naming_it(tmp_path):
    from loopus.train.checkpointing import STATE_FILE, load_checkpoint

    path = write_training_checkpoint(tmp_path, 2)
    (path / STATE_FILE).write_text('{"step": 2, "tok')
    with pytest.raises(CheckpointError, match=re.escape(f"{path / STATE_FILE} is corrupt or truncated")):
        load_checkpoint(path)


def test_non_finite_weights_never_become_a_checkpoint(tmp_path):
    from loopus.train.checkpointing import list_checkpoints, staging_dir

    good = write_training_checkpoint(tmp_path, 2)
    with pytest.raises(CheckpointError, match=r"non-finite weights \['w'\]"):
        write_training_checkpoint(tmp_path, 4, weight=float("nan"))
    assert list_checkpoints(tmp_path) == [good]
    assert not staging_dir(tmp_path, 4).exists()


def test_a_checkpoint_whose_weights_diverged_is_set_aside_and_the_good_one_named(tmp_path):
    """A resume replays the same batch on the same weights, so a checkpoint written at the step whose next
    update diverged gives a non-finite loss again at any --lr: it leaves the resumable set."""
    from loopus.train.checkpointing import latest_checkpoint, set_aside_diverged

    good = write_training_checkpoint(tmp_path, 1)
    poisoned = write_training_checkpoint(tmp_path, 2)
    assert set_aside_diverged(tmp_path, 3) == poisoned  # diverged two steps after it: still resumable
    assert set_aside_diverged(tmp_path, 2) == good
    assert latest_checkpoint(tmp_path) == good and not poisoned.exists()
    assert (poisoned.parent / "diverged-step-00000002" / "trainable.safetensors").is_file()
    assert set_aside_diverged(tmp_path, 1) is None and latest_checkpoint(tmp_path) is None
