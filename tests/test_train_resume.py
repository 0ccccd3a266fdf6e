"""Runs that can be extended exactly, resumes that refuse what they cannot continue, and refused options."""

from __future__ import annotations

import json

import pytest
import torch

from loopus.cli import main as cli_main
from loopus.train import TrainConfig, Trainer, TrainingDiverged
from loopus.train.checkpointing import list_checkpoints
from loopus.train.data import build_data
from conftest import char_tokenizer
from test_train_helpers import tiny_loopus, write_corpus

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root, docs=2000)
    write_corpus(root, "other", docs=2000, seed=3)
    return root


def config(out, corpus, **overrides):
    values = dict(model="unused", out=str(out), data=str(corpus), corpus=["tiny"], seq_len=16, batch_size=2,
                  grad_accum=2, max_steps=4, lr=1e-2, horizon_min=1, horizon_max=3, eval_at_start=False,
                  eval_at_end=False, progress=False, tensorboard=False, depth_lora_rank=0, schedule="constant",
                  warmup_steps=0)
    values.update(overrides)
    return TrainConfig.of(**values)


def steps_logged(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "logs" / "train.jsonl").read_text().splitlines()) if "lm" in r]


def test_the_data_order_does_not_depend_on_how_many_rows_a_run_packs(corpus):
    tok = char_tokenizer()
    short = build_data(tok, ["tiny=3", "other=1"], str(corpus), 16, 1024, 2, seed=4)
    long = build_data(tok, ["tiny=3", "other=1"], str(corpus), 16, 3072, 2, seed=4)
    assert long.train.shape[0] == 3072 and short.mix == {"tiny": 768, "other": 256}
    assert torch.equal(short.train[short.indices(0, 1024)], long.train[long.indices(0, 1024)])
    read = short.mix_of(100)  # what a run of 100 rows reads: the same in both, from both corpora
    assert read == long.mix_of(100) and sum(read.values()) == 100 and min(read.values()) > 0


def test_extending_a_finished_run_equals_the_longer_run(tmp_path, corpus):
    tok = char_tokenizer()
    straight = Trainer(config(tmp_path / "eight", corpus, max_steps=8, save_every=2), model=tiny_loopus("llama"),
                       tokenizer=tok)
    straight.train()
    first = Trainer(config(tmp_path / "four", corpus, max_steps=4, save_every=2), model=tiny_loopus("llama"),
                    tokenizer=tok)
    first.train()
    assert list_checkpoints(tmp_path / "four")[-1].name == "step-00000004"  # the end of a run is resumable
    extended = Trainer(config(tmp_path / "four", corpus, max_steps=8, save_every=2, resume=True),
                       model=tiny_loopus("llama"), tokenizer=tok)
    extended.train()
    assert extended.step == 8
    a, b = straight.core.state_dict(), extended.core.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert steps_logged(tmp_path / "four") == [
        {k: v for k, v in r.items() if k not in ("step_s", "tokens_per_s")} | {"step_s": s["step_s"],
                                                                               "tokens_per_s": s["tokens_per_s"]}
        for r, s in zip(steps_logged(tmp_path / "eight"), steps_logged(tmp_path / "four"))]


def test_a_resumed_run_logs_each_step_once(tmp_path, corpus):
    tok = char_tokenizer()
    killed = Trainer(config(tmp_path / "k", corpus, max_steps=6, save_every=2), model=tiny_loopus("llama"),
                     tokenizer=tok)

    def kill(trainer, step, metrics):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")

    killed.callbacks.append(kill)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert [r["step"] for r in steps_logged(tmp_path / "k")] == [1, 2, 3, 4, 5]
    Trainer(config(tmp_path / "k", corpus, max_steps=6, save_every=2, resume=True), model=tiny_loopus("llama"),
            tokenizer=tok).train()
    assert [r["step"] for r in steps_logged(tmp_path / "k")] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_other_starting_weights(tmp_path, corpus):
    tok = char_tokenizer()
    Trainer(config(tmp_path / "m", corpus, max_steps=2), model=tiny_loopus("llama"), tokenizer=tok).train()
    other = Trainer(config(tmp_path / "m", corpus, max_steps=3, resume=True), model=tiny_loopus("llama", seed=1),
                    tokenizer=tok)
    with pytest.raises(ValueError, match="other starting weights"):
        other.train()
    same = Trainer(config(tmp_path / "m", corpus, max_steps=3, resume=True), model=tiny_loopus("llama"),
                   tokenizer=tok)
    same.train()
    assert same.step == 3


def test_no_checkpoint_keeps_non_finite_weights(tmp_path, corpus):
    trainer = Trainer(config(tmp_path / "inf", corpus, save_every=1), model=tiny_loopus("llama"),
                      tokenizer=char_tokenizer())
    weight = trainer.core.layers[2].mlp.down_proj.weight

    def blow_up(optimizer, args, kwargs):
        if trainer.step == 1:  # inside optimiser step 2: the update leaves an inf weight, the loss was finite
            with torch.no_grad():
                weight[0, 0] = float("inf")

    trainer.optimizer.register_step_post_hook(blow_up)
    with pytest.raises(TrainingDiverged, match="non-finite by optimiser step 2.*step-00000001"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / "inf")] == ["step-00000001"]


def test_resume_says_when_there_is_nothing_to_resume(tmp_path, corpus, capsys):
    trainer = Trainer(config(tmp_path / "absent", corpus, max_steps=1, resume=True), model=tiny_loopus("llama"),
                      tokenizer=char_tokenizer())
    trainer.train()
    assert f"--resume: {tmp_path / 'absent'} does not exist; starting from step 0" in capsys.readouterr().out
    assert trainer.step == 1


def test_validation_shows_a_progress_bar(tmp_path, corpus, capsys):
    Trainer(config(tmp_path / "bar", corpus, max_steps=1, eval_at_start=True, progress=True, val_tokens=64),
            model=tiny_loopus("llama"), tokenizer=char_tokenizer()).train()
    assert "validate[before]" in capsys.readouterr().err


def test_a_split_given_for_a_loopus_checkpoint_must_be_its_own(tmp_path, corpus):
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="own split .* leave out --encoder-layers/--decoder-layers"):
        Trainer(config(tmp_path / "s", corpus, encoder_layers=2, decoder_layers=1), model=tiny_loopus("llama"),
                tokenizer=tok)
    same = Trainer(config(tmp_path / "t", corpus, encoder_layers=1, decoder_layers=1), model=tiny_loopus("llama"),
                   tokenizer=tok)
    assert same.cfg.build.encoder_layers == 1


@pytest.mark.parametrize("flags, message", [
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--max-steps", "-3"], "--max-steps must be >= 1, got -3"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["--max-steps", "4", "--max-tokens", "1000"], "give one length of the run, not both"),
])
def test_a_run_length_that_trains_nothing_or_twice_is_refused_before_any_work(tmp_path, capsys, flags, message):
    # the corpus does not exist: the refusal comes before anything is read
    code = cli_main(["train", "--out", str(tmp_path / "x"), "--data", str(tmp_path), "--corpus", "absent", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "x").exists()


def test_a_dense_checkpoint_of_the_earlier_flat_config_resumes(tmp_path, corpus):
    """Earlier releases saved the options flat and as given (a dense run's plan options unresolved)."""
    from loopus.train.checkpointing import STATE_FILE

    tok = char_tokenizer()
    Trainer(config(tmp_path / "d", corpus, mode="dense", max_steps=2), model=tiny_loopus("llama"),
            tokenizer=tok).train()
    state_file = list_checkpoints(tmp_path / "d")[-1] / STATE_FILE
    state = json.loads(state_file.read_text())
    flat = TrainConfig.saved(state["config"]).flat()
    state["config"] = {**flat, "horizon_min": 2, "horizon_max": 4, "supervised_min": 2, "supervised_max": 2}
    del state["model_digest"]  # not written then
    state_file.write_text(json.dumps(state))
    resumed = Trainer(config(tmp_path / "d", corpus, mode="dense", max_steps=3, resume=True),
                      model=tiny_loopus("llama"), tokenizer=tok)
    resumed.train()
    assert resumed.step == 3
