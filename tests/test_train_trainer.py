"""The trainer: loss falls, exact resume, NaN guard, CLI + config file, dense mode, 2 processes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from loopus.checkpoint import check_model_dir
from loopus.cli import main as cli_main
from loopus.train import TrainConfig, Trainer, TrainingDiverged
from loopus.train.checkpointing import STATE_FILE, list_checkpoints, load_checkpoint
from loopus.train.data import build_data
from conftest import char_tokenizer, tiny_base
from test_train_helpers import kill_inside_step, tiny_loopus, write_corpus

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    return root


@pytest.fixture(scope="module")
def packed(corpus):
    return build_data(char_tokenizer(), ["tiny"], str(corpus), seq_len=16, train_rows=64, valid_rows=4)


def config(out, corpus, **overrides):
    values = dict(model="unused", out=str(out), data=str(corpus), corpus=["tiny"], seq_len=16, batch_size=2,
                  grad_accum=2, max_steps=6, lr=1e-2, horizon_min=1, horizon_max=4, supervised_min=1,
                  supervised_max=2, eval_loops=[1, 2, 4], eval_at_start=False, eval_at_end=False,
                  progress=False, tensorboard=False, save_every=2,
                  # these tests are about the trainer's mechanics on full-weight RDS, not the default recipe
                  depth_lora_rank=0, freeze=["embeddings", "encoder"])
    values.update(overrides)
    return TrainConfig.of(**values)


def test_loss_falls_on_a_tiny_model(tmp_path, corpus):
    cfg = config(tmp_path / "run", corpus, max_steps=40, lr=3e-3, grad_accum=1, batch_size=4, seq_len=32,
                 eval_at_start=True, eval_at_end=True, save_every=0, val_tokens=256, tensorboard=True)
    history = Trainer(cfg, model=tiny_loopus("gemma3_text"), tokenizer=char_tokenizer()).train()
    for n in ("1", "2", "4"):
        assert history["after"][n]["loss"] < history["before"][n]["loss"] - 0.1
    log = [json.loads(line) for line in (tmp_path / "run" / "logs" / "train.jsonl").read_text().splitlines()]
    steps = [r for r in log if "lm" in r]
    assert len(steps) == 40 and all(any(k.startswith("lm@") for k in r) for r in steps)
    assert any(r.get("event") == "validation" and "ece" in r["valid"]["2"] for r in log)
    assert list((tmp_path / "run" / "logs" / "tb").iterdir())  # TensorBoard events
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert type(model).__name__ == "LoopUSForCausalLM"


@pytest.mark.parametrize("recipe", [
    {},
    # depth-wise adapters and the KL term to a frozen copy of the model as it was before training
    {"depth_lora_rank": 4, "kl_base": 1.0, "supervise_first": True},
], ids=["rds", "depth-adapters-kl"])
def test_killed_and_resumed_run_ends_bit_identical(tmp_path, corpus, packed, recipe):
    tok = char_tokenizer()
    straight = Trainer(config(tmp_path / "a", corpus, **recipe), model=tiny_loopus("llama"), tokenizer=tok,
                       data=packed)
    straight.train()

    killed = Trainer(config(tmp_path / "b", corpus, **recipe), model=tiny_loopus("llama"), tokenizer=tok, data=packed)

    kill_inside_step(killed, 4, 3)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-00000002", "step-00000004"]
    assert not (tmp_path / "b" / "model.safetensors").exists()

    resumed = Trainer(config(tmp_path / "b", corpus, resume=True, **recipe), model=tiny_loopus("llama"),
                      tokenizer=tok, data=packed)
    resumed.train()
    assert resumed.step == straight.step == 6
    a, b = straight.core.state_dict(), resumed.core.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and it really trained
    assert not torch.equal(a["base.model.layers.5.mlp.up_proj.weight"],
                           tiny_loopus("llama").state_dict()["base.model.layers.5.mlp.up_proj.weight"])


def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_master_weights(tmp_path, corpus, packed):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # the process-wide state of the other tests is fp32
    try:
        trainer = Trainer(config(tmp_path / "bf16", corpus, precision="bf16", max_steps=2, save_every=0),
                          model=tiny_loopus("llama"), tokenizer=char_tokenizer(), data=packed)
        seen = []
        trainer.core.layers[2].mlp.down_proj.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        before = trainer.core.layers[2].mlp.down_proj.weight.detach().clone()
        trainer.train()
    finally:
        AcceleratorState._reset_state(True)
    assert seen and set(seen) == {torch.bfloat16}
    weight = trainer.core.layers[2].mlp.down_proj.weight
    assert all(p.dtype == torch.float32 for p in trainer.core.parameters())
    assert not torch.equal(weight, before) and torch.isfinite(weight).all()


def test_fsdp_refuses_lora_and_a_missing_process_group(tmp_path, corpus, packed):
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="LoRA adapters cannot be trained with FSDP"):
        Trainer(config(tmp_path / "l", corpus, fsdp=True, lora_rank=4), model=tiny_loopus("llama"), tokenizer=tok,
                data=packed)
    with pytest.raises(ValueError, match="needs a process group: start the run with `accelerate launch`"):
        Trainer(config(tmp_path / "p", corpus, fsdp=True), model=tiny_loopus("llama"), tokenizer=tok, data=packed)


def test_resume_refuses_changed_settings(tmp_path, corpus, packed):
    tok = char_tokenizer()
    Trainer(config(tmp_path / "r", corpus, max_steps=3), model=tiny_loopus("llama"), tokenizer=tok, data=packed).train()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(config(tmp_path / "r", corpus, max_steps=4), model=tiny_loopus("llama"), tokenizer=tok,
                data=packed).train()
    changed = Trainer(config(tmp_path / "r", corpus, max_steps=4, seed=5, resume=True), model=tiny_loopus("llama"),
                      tokenizer=tok, data=packed)
    with pytest.raises(ValueError, match="seed"):
        changed.train()


def test_resume_reads_an_option_the_checkpoint_predates_as_its_default(tmp_path, corpus, packed):
    tok = char_tokenizer()
    Trainer(config(tmp_path / "o", corpus, max_steps=3), model=tiny_loopus("llama"), tokenizer=tok, data=packed).train()
    state_file = list_checkpoints(tmp_path / "o")[-1] / STATE_FILE
    state = json.loads(state_file.read_text())
    del state["config"]["build"]["depth_lora_rank"], state["config"]["dataset"]["rows_per_doc"]  # as written before the options existed
    state_file.write_text(json.dumps(state))
    resumed = Trainer(config(tmp_path / "o", corpus, max_steps=4, resume=True), model=tiny_loopus("llama"),
                      tokenizer=tok, data=packed)
    resumed.train()
    assert resumed.step == 4
    adapted = Trainer(config(tmp_path / "o", corpus, max_steps=5, resume=True, depth_lora_rank=4),
                      model=tiny_loopus("llama"), tokenizer=tok, data=packed)
    with pytest.raises(ValueError, match="depth_lora_rank"):
        adapted.train()
    spread = Trainer(config(tmp_path / "o", corpus, max_steps=5, resume=True, rows_per_doc=2),
                     model=tiny_loopus("llama"), tokenizer=tok, data=packed)
    with pytest.raises(ValueError, match="rows_per_doc"):
        spread.train()
    with pytest.raises(ValueError, match="rows_per_doc must be >= 1 with packing=documents"):
        config(tmp_path / "p", corpus, max_steps=1, rows_per_doc=2, packing="stream").validate()


def test_rng_states_of_a_checkpoint_from_before_accelerate_still_restore(tmp_path):
    """Checkpoints written before the RNG states were Accelerate's hold them as rng-rank{r}.pt."""
    import random

    import numpy as np
    from accelerate import Accelerator

    from loopus.train.checkpointing import load_rng

    np_state = np.random.get_state()
    torch.save({"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()),
                                                       *np_state[2:]], "torch": torch.get_rng_state()},
               tmp_path / "rng-rank0.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    load_rng(Accelerator(), tmp_path)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])


def test_trackers_named_in_log_with_must_exist(tmp_path, corpus):
    with pytest.raises(ValueError, match="TensorBoard is the `tensorboard` option"):
        config(tmp_path / "t", corpus, log_with=["tensorboard"])
    with pytest.raises(ValueError, match=r"unknown or not installed: \['no-such-tracker'\]"):
        Trainer(config(tmp_path / "n", corpus, log_with="no-such-tracker"), model=tiny_loopus("llama"),
                tokenizer=char_tokenizer())


def test_nan_stops_cleanly_and_the_last_checkpoint_loads(tmp_path, corpus, packed):
    tok = char_tokenizer()
    trainer = Trainer(config(tmp_path / "n", corpus), model=tiny_loopus("llama"), tokenizer=tok, data=packed)
    last_layer = trainer.core.layers[-1]
    handle = last_layer.register_forward_hook(
        lambda module, args, output: output * float("nan") if trainer.step == 3 else None
    )
    with pytest.raises(TrainingDiverged, match="non-finite .* optimiser step 4.*step-00000002"):
        trainer.train()
    handle.remove()
    assert [p.name for p in list_checkpoints(tmp_path / "n")] == ["step-00000002"]
    assert not (tmp_path / "n" / "model.safetensors").exists()
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "n")[-1])
    assert all(torch.isfinite(t).all() for t in ckpt["trainable"].values())
    assert ckpt["state"]["step"] == 2
    # the clean checkpoint resumes to the end
    resumed = Trainer(config(tmp_path / "n", corpus, resume=True), model=tiny_loopus("llama"), tokenizer=tok,
                      data=packed)
    resumed.train()
    check_model_dir(tmp_path / "n")


def test_a_checkpoint_of_the_weights_that_diverged_is_set_aside_and_the_one_before_named(tmp_path, corpus,
                                                                                         packed):
    # the update after step 2 diverges: step 2's weights give the non-finite loss again on any resume
    tok = char_tokenizer()
    trainer = Trainer(config(tmp_path / "n", corpus, save_every=1, keep_checkpoints=3), model=tiny_loopus("llama"),
                      tokenizer=tok, data=packed)
    handle = trainer.core.layers[-1].register_forward_hook(
        lambda module, args, output: output * float("nan") if trainer.step == 2 else None
    )
    with pytest.raises(TrainingDiverged, match="non-finite .* optimiser step 3.*step-00000001"):
        trainer.train()
    handle.remove()
    assert [p.name for p in list_checkpoints(tmp_path / "n")] == ["step-00000001"]
    assert (tmp_path / "n" / "checkpoints" / "diverged-step-00000002").is_dir()


def test_resume_with_a_new_lr_takes_effect(tmp_path, corpus, packed, capsys):
    """`--resume --lr X` re-bases the schedule to X (optimiser/scheduler state would bring the old lr back)."""
    from loopus.train.optim import is_new_module, lr_factor

    tok = char_tokenizer()
    first = Trainer(config(tmp_path / "lr", corpus, max_steps=4, new_module_lr_mult=3.0), model=tiny_loopus("llama"),
                    tokenizer=tok, data=packed)

    def stop_after_step_three(trainer, step, metrics):  # before the end, which would leave a checkpoint too
        if step == 3:
            raise KeyboardInterrupt("simulated kill")

    first.callbacks.append(stop_after_step_three)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert [p.name for p in list_checkpoints(tmp_path / "lr")] == ["step-00000002"]
    assert load_checkpoint(list_checkpoints(tmp_path / "lr")[-1])["state"]["config"]["optim"]["lr"] == 1e-2
    capsys.readouterr()
    for f in (tmp_path / "lr").glob("*.safetensors"):
        f.unlink()

    seen: list[list[float]] = []
    resumed = Trainer(config(tmp_path / "lr", corpus, max_steps=4, new_module_lr_mult=3.0, lr=1e-3, resume=True),
                      model=tiny_loopus("llama"), tokenizer=tok, data=packed,
                      callbacks=[lambda trainer, step, metrics: seen.append(
                          [g["lr"] for g in trainer.optimizer.param_groups])])
    used: list[list[float]] = []  # the lr each resumed update really used
    resumed.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: used.append([g["lr"] for g in optimizer.param_groups]))
    resumed.train()
    assert resumed.step == 4
    names = {id(q): n for n, q in resumed.module.named_parameters()}
    mults = [3.0 if is_new_module(names[id(g["params"][0])]) else 1.0 for g in resumed.optimizer.param_groups]
    assert sorted(set(mults)) == [1.0, 3.0]  # both the base groups and the new-module groups are checked
    for step, lrs in zip((2, 3), used):
        expected = [1e-3 * m * lr_factor(step, 4, 0, "cosine", 0.1) for m in mults]
        assert lrs == pytest.approx(expected, rel=1e-12), step
    assert seen[-1] == pytest.approx([1e-3 * m * lr_factor(4, 4, 0, "cosine", 0.1) for m in mults], rel=1e-12)
    assert [g["initial_lr"] for g in resumed.optimizer.param_groups] == pytest.approx([1e-3 * m for m in mults])
    assert resumed.scheduler.base_lrs == pytest.approx([1e-3 * m for m in mults])
    out = capsys.readouterr().out
    assert "resuming with lr 0.001 (checkpoint had 0.01)" in out
    assert json.loads((tmp_path / "lr" / "train_config.json").read_text())["optim"]["lr"] == 1e-3
    log = [json.loads(line) for line in (tmp_path / "lr" / "logs" / "train.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "lr_rebased" and r["lr"] == 1e-3 and r["checkpoint_lr"] == 1e-2 for r in log)


def test_seq_len_beyond_the_base_models_positions_is_refused(tmp_path, corpus):
    tok = char_tokenizer()  # the tiny models have max_position_embeddings 128
    for mode in ("loopus", "dense"):
        cfg = config(tmp_path / mode, corpus, seq_len=129, mode=mode)
        cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, corpus=("not-there",)))
        # the refusal comes before any training work: the (missing) corpus is never read
        with pytest.raises(ValueError, match="--seq-len 129 exceeds the base model's max_position_embeddings 128"):
            Trainer(cfg, model=tiny_loopus("llama"), tokenizer=tok)
    trainer = Trainer(config(tmp_path / "ok", corpus, seq_len=128, max_steps=1), model=tiny_loopus("llama"),
                      tokenizer=tok)
    assert trainer.data.train.shape[1] == 129


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tinybase")
    tiny_base("gemma3_text").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def test_cli_with_config_file_and_dense_mode(tmp_path, corpus, tiny_dir, capsys):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(
        "encoder-layers: 1\ndecoder_layers: 1\nseq_len: 16\nbatch_size: 2\nmax_steps: 3\nlr: 0.001\n"
        "eval_loops: [1, 2]\nval_tokens: 64\nprogress: false\nlora_rank: 4\ngradient_checkpointing: true\n"
    )
    out = tmp_path / "loopus"
    code = cli_main(["train", "--model", str(tiny_dir), "--data", str(corpus), "--corpus", "tiny", "--out", str(out),
                     "--config", str(cfg_file), "--max-steps", "2"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps"] == 2 and set(printed["valid_loss"]["after"]) == {"1", "2"}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LoopUSForCausalLM" and model.config.encoder_layers == 1
    assert not any("lora" in n for n, _ in model.named_parameters())  # adapters merged

    dense = tmp_path / "dense"
    code = cli_main(["train", "--model", str(tiny_dir), "--data", str(corpus), "--corpus", "tiny", "--out", str(dense),
                     "--mode", "dense", "--max-steps", "2", "--seq-len", "16", "--progress", "false",
                     "--val-tokens", "64"])
    assert code == 0
    assert type(AutoModelForCausalLM.from_pretrained(dense)).__name__ == "Gemma3ForCausalLM"


def test_dense_from_a_loopus_model_freezes_the_same_encoder_layers(tmp_path, corpus, packed):
    """The dense baseline trains the layers LoopUS trains: --freeze encoder uses the LoopUS split."""
    cfg = config(tmp_path / "d", corpus, mode="dense", max_steps=1, freeze=["embeddings", "encoder"])
    trainer = Trainer(cfg, model=tiny_loopus("llama", encoder=2), tokenizer=char_tokenizer(), data=packed)
    encoder = trainer.cfg.build.encoder_layers
    assert encoder == 2  # read from the LoopUS model's split
    trains = {n: p.requires_grad for n, p in trainer.module.named_parameters()}
    assert trains and all(not t for n, t in trains.items() if any(f"layers.{i}." in n for i in range(encoder)))
    assert any(t for n, t in trains.items() if f"layers.{encoder}." in n)


def test_cli_errors_are_one_line(tmp_path, corpus, tiny_dir, capsys):
    code = cli_main(["train", "--model", str(tiny_dir), "--data", str(corpus), "--out", str(tmp_path / "x"),
                     "--max-steps", "1", "--corpus", "tiny"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "--encoder-layers" in err and len(err.splitlines()) == 1
    code = cli_main(["train", "--model", str(tiny_dir), "--out", str(tmp_path / "y"), "--max-steps", "1",
                     "--encoder-layers", "1", "--decoder-layers", "1", "--data", str(corpus), "--corpus", "missing",
                     "--seq-len", "16"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("loopus train: error:") and "'missing' not found" in err


def test_cli_trains_on_a_single_jsonl_file(tmp_path, corpus, tiny_dir, capsys):
    """`--data FILE.jsonl` (as --help says) is the corpus itself, with the default corpus name."""
    out = tmp_path / "file"
    data_file = corpus / "tiny" / "train.jsonl"
    code = cli_main(["train", "--model", str(tiny_dir), "--data", str(data_file), "--out", str(out), "--mode", "dense",
                     "--max-steps", "1", "--seq-len", "16", "--batch-size", "2", "--val-tokens", "32",
                     "--progress", "false", "--tensorboard", "false"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["steps"] == 1
    start = json.loads((out / "logs" / "train.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["mix"] == {str(data_file): 2} and start["valid_rows"] >= 1


def test_cli_error_line_ends_an_open_progress_bar(monkeypatch, capsys):
    """A command failing under an open progress bar: the error still gets a line of its own."""
    import loopus.commands.train as train_command
    from tqdm.auto import tqdm

    def failing(args):
        bar = tqdm(total=3, desc="Writing model shards", file=sys.stderr)
        bar.update(1)
        raise FileNotFoundError("data directory X does not exist")

    monkeypatch.setattr(train_command, "run", failing)
    assert cli_main(["train", "--out", "x"]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()  # tqdm redraws with \r, which splitlines also breaks on
    assert "loopus train: error: data directory X does not exist" in lines
    assert err.endswith("loopus train: error: data directory X does not exist\n")
    assert err.count("Writing model shards") >= 1 and "Traceback" not in err


def launch_two_processes(out, corpus, tiny_dir, *extra: str) -> None:
    """`accelerate launch` of `loopus train` on 2 CPU processes (gloo), 3 steps, a checkpoint at step 2."""
    # accelerate launches CPU workers through torchrun with --multi_gpu plus ACCELERATE_USE_CPU (gloo backend)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ACCELERATE_USE_CPU="true")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "loopus.cli", "train", "--model", str(tiny_dir), "--data", str(corpus), "--corpus", "tiny",
               "--out", str(out), "--encoder-layers", "1", "--decoder-layers", "1", "--seq-len", "16",
               "--batch-size", "2", "--max-steps", "3", "--lr", "0.001", "--eval-loops", "1,2", "--val-tokens", "64",
               "--save-every", "2", "--progress", "false", "--threads", "1", "--horizon-min", "2",
               # one lr for every group: at 1000x the gate's steps would magnify the cross-process sum order
               "--new-module-lr-mult", "1", "--freeze", "embeddings", "--depth-lora-rank", "0", *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def final_weights(out) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(out).state_dict())


def test_two_process_accelerate_launch_trains_and_saves(tmp_path, corpus, tiny_dir):
    out = tmp_path / "ddp"
    launch_two_processes(out, corpus, tiny_dir)
    log = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    assert log[0]["processes"] == 2
    steps = [r for r in log if "lm" in r]
    assert len(steps) == 3 and steps[-1]["tokens"] == 3 * 2 * 2 * 16
    assert (out / "checkpoints" / "step-00000002" / "random_states_1.pkl").is_file()  # rank 1's RNG states
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LoopUSForCausalLM"


def assert_same_training(replicated, sharded, tiny_dir, prefix: str) -> dict[str, torch.Tensor]:
    """Both runs trained 3 steps on 2 processes and ended with the same weights; returns the sharded ones."""
    log = [json.loads(line) for line in (sharded / "logs" / "train.jsonl").read_text().splitlines()]
    assert log[0]["processes"] == 2 and len([r for r in log if "lm" in r]) == 3
    reference, result = final_weights(replicated), final_weights(sharded)
    assert reference.keys() == result.keys()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    assert any(not torch.equal(result[prefix + k], v) for k, v in base.items()), "training changed no weight"
    for name in reference:  # the same update; only the order of the cross-process sums differs
        torch.testing.assert_close(result[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    return result


def test_fsdp_matches_replicated_training_and_resumes_exactly(tmp_path, corpus, tiny_dir):
    """FSDP2 (sharded, with gradient checkpointing) and replicated training take the same steps; an FSDP
    resume is bit-identical."""
    replicated, sharded = tmp_path / "replicated", tmp_path / "fsdp"
    launch_two_processes(replicated, corpus, tiny_dir)
    launch_two_processes(sharded, corpus, tiny_dir, "--fsdp", "true", "--gradient-checkpointing", "true")
    result = assert_same_training(replicated, sharded, tiny_dir, prefix="base.")

    # Resume from the step-2 checkpoint the sharded run wrote: step 3 again, bit for bit.
    for f in sharded.glob("*.safetensors"):
        f.unlink()
    shutil.rmtree(sharded / "checkpoints" / "step-00000003")  # the end of the run: resume from step 2 instead
    assert load_checkpoint(sharded / "checkpoints" / "step-00000002")["state"]["sharded"]
    launch_two_processes(sharded, corpus, tiny_dir, "--fsdp", "true", "--gradient-checkpointing", "true", "--resume")
    resumed = final_weights(sharded)
    assert all(torch.equal(resumed[k], result[k]) for k in result)


def test_fsdp_dense_baseline_matches_replicated(tmp_path, corpus, tiny_dir):
    replicated, sharded = tmp_path / "replicated", tmp_path / "fsdp"
    launch_two_processes(replicated, corpus, tiny_dir, "--mode", "dense")
    launch_two_processes(sharded, corpus, tiny_dir, "--mode", "dense", "--fsdp", "true")
    assert_same_training(replicated, sharded, tiny_dir, prefix="")
    assert type(AutoModelForCausalLM.from_pretrained(sharded)).__name__ == "Gemma3ForCausalLM"
