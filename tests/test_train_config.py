"""TrainConfig: frozen sub-configs, one resolve step that sees the runtime, named recipes, generated CLI flags."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from loopus.cli import build_parser
from loopus.cli import main as cli_main
from loopus.commands.train import config_from_args
from loopus.train import Runtime, TrainConfig, Trainer, resolve
from loopus.train.config import ConfigFileError
from loopus.train.data import build_data
from loopus.train.recipes import DEFAULT, DENSE, FROZEN_BASE, PAPER, RECIPES
from conftest import char_tokenizer
from test_train_helpers import tiny_loopus, write_corpus

# the flags `loopus train` had before they were generated from the options: the public contract
FLAGS = ("model data out mode encoder_layers decoder_layers gate_rank gate_init freeze lora_rank lora_alpha "
         "lora_dropout depth_lora_rank depth_lora_alpha depth_lora_count gradient_checkpointing precision fsdp corpus "
         "text_field seq_len packing rows_per_doc batch_size grad_accum max_steps max_tokens val_tokens val_fraction "
         "seed threads lr new_module_lr_mult adapter_lr_mult min_lr_ratio weight_decay warmup_steps warmup_ratio "
         "schedule max_grad_norm horizon_min horizon_max supervised_min supervised_max grad_steps supervise_last "
         "supervise_first beta_mono lambda_conf conf_margin kl_base ce_chunk log_every eval_every eval_loops "
         "eval_batch_size eval_at_start eval_at_end save_every keep_checkpoints progress tensorboard log_with").split()


def train_parser():
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices["train"]


def parse(*argv: str):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_every_flag_keeps_its_spelling_and_shows_help_default_and_choices():
    actions = {a.dest: a for a in train_parser()._actions}
    for name in FLAGS:
        action = actions[name]
        assert action.option_strings == ["--" + name.replace("_", "-")], name
        assert action.help and "default" in action.help, name
    for name, values in (("mode", {"loopus", "dense"}), ("precision", {"auto", "fp32", "bf16"}),
                         ("schedule", {"cosine", "linear", "constant"}), ("packing", {"documents", "stream"})):
        assert set(actions[name].choices) == values, name
    assert set(actions["recipe"].choices) == set(RECIPES)


def test_a_recipe_is_picked_by_name_and_flags_override_single_options():
    paper = parse("--out", "x", "--max-steps", "1", "--recipe", "paper", "--lr", "3e-5").flat()
    assert paper["lr"] == 3e-5
    assert all(paper[k] == (list(v) if isinstance(v, tuple) else v) for k, v in PAPER.items() if k != "lr")
    assert parse("--out", "x", "--max-steps", "1", "--recipe", "dense").build.mode == "dense"
    assert parse("--out", "x", "--max-steps", "1", "--recipe", "frozen_base").build.freeze == FROZEN_BASE["freeze"]
    assert parse("--out", "x", "--max-steps", "1").flat() == TrainConfig.of(out="x", max_steps=1).flat()
    assert DENSE["mode"] == "dense" and DEFAULT["mode"] == "loopus"


def test_config_files_work_flat_or_nested_and_a_malformed_one_is_named(tmp_path, capsys):
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.json"
    flat.write_text("seq-len: 64\nlr: 0.001\nfreeze: [embeddings]\nrecipe: paper\n")
    nested.write_text(json.dumps({"dataset": {"seq_len": 64}, "optim": {"lr": 0.001},
                                  "build": {"freeze": ["embeddings"]}, "recipe": "paper"}))
    a = parse("--out", "x", "--max-steps", "1", "--config", str(flat))
    b = parse("--out", "x", "--max-steps", "1", "--config", str(nested))
    assert a == b and a.dataset.seq_len == 64 and a.optim.lr == 0.001 and a.rds.horizon_max == PAPER["horizon_max"]
    assert parse("--out", "x", "--max-steps", "1", "--config", str(flat), "--lr", "0.5").optim.lr == 0.5
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [0.001\nseq_len: 64\n")
    with pytest.raises(ConfigFileError, match=f"config file {broken} is not valid YAML"):
        TrainConfig.read_file(broken)
    assert cli_main(["train", "--out", str(tmp_path / "o"), "--config", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"loopus train: error: config file {broken} is not valid YAML")
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{\"lr\": ")
    with pytest.raises(ConfigFileError, match=f"config file {bad_json} is not valid JSON"):
        TrainConfig.read_file(bad_json)


def test_the_config_is_frozen_and_resolve_returns_a_copy():
    cfg = TrainConfig.of(max_steps=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_steps = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0
    resolved = resolve(cfg, Runtime(device="cuda"))
    assert cfg.build.depth_lora_rank is None and cfg.precision == "auto"  # untouched
    assert resolved.build.depth_lora_rank == DEFAULT["depth_lora_rank"] and resolved.precision == "bf16"
    assert resolve(resolved, Runtime(device="cuda")) == resolved  # idempotent: a saved config reads back the same
    assert TrainConfig.saved(resolved.to_dict()) == resolved


def test_accelerates_own_fsdp_setting_drops_the_default_depth_adapters(monkeypatch):
    """`accelerate launch --use_fsdp` (no --fsdp flag) resolves like --fsdp: no depth adapters by default,
    and a clear refusal where they are asked for."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    runtime = Runtime.detect()
    assert runtime.fsdp and runtime.processes == 2
    resolved = resolve(TrainConfig.of(max_steps=1), runtime)
    assert resolved.fsdp and resolved.build.depth_lora_rank == 0
    with pytest.raises(ValueError, match="pass --depth-lora-rank 0"):
        resolve(TrainConfig.of(max_steps=1, depth_lora_rank=16), runtime)


def test_trainer_under_accelerates_fsdp_does_not_refuse_the_default_recipe(tmp_path):
    """An Accelerator that runs FSDP (the README's GPU route) with every option left at its default: the
    trainer gets as far as asking for the process group, instead of refusing depth adapters it chose."""
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=1, process_index=0,
                                  device=torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a process group"):
        Trainer(TrainConfig.of(out=str(tmp_path), max_steps=1), model=tiny_loopus("llama"),
                tokenizer=char_tokenizer(), accelerator=accelerator)


def test_trainer_resolves_its_own_copy_and_saves_and_logs_it(tmp_path):
    write_corpus(tmp_path / "data")
    data = build_data(char_tokenizer(), ["tiny"], str(tmp_path / "data"), seq_len=16, train_rows=4, valid_rows=2)
    cfg = TrainConfig.of(model="unused", out=str(tmp_path / "run"), data=str(tmp_path / "data"), corpus=["tiny"],
                         seq_len=16, batch_size=2, max_steps=1, mode="dense", eval_at_start=False,
                         eval_at_end=False, progress=False, tensorboard=False)
    before = cfg.to_dict()
    trainer = Trainer(cfg, model=tiny_loopus("llama", encoder=2), tokenizer=char_tokenizer(), data=data)
    trainer.train()
    assert cfg.to_dict() == before  # the caller's config is never written
    assert trainer.cfg.build.encoder_layers == 2 and trainer.cfg.precision == "fp32"
    assert trainer.cfg.rds.horizon_max == 1  # a dense run's objective: its one loop
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved == trainer.cfg.to_dict() and TrainConfig.saved(saved) == trainer.cfg
