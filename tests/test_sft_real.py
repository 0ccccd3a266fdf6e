"""Supervised fine-tuning with the real embedded Gemma 3 270M: its tokenizer's labels token by token, and a short
SFT run on ProntoQA answers."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from loopus.text import IGNORE_INDEX
from loopus.train import TrainConfig, Trainer
from loopus.train.data import build_data, split_row
from loopus.train.sft import SFTDataError

pytestmark = pytest.mark.real

# Gemma's turn format, as a Jinja file a user would pass with --chat-template
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else "
                  "m['role'] %}{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def prontoqa(data_dir, tmp_path, n):
    """The first `n` ProntoQA 1-hop training items as prompt/completion records."""
    lines = (data_dir / "prontoqa" / "1hop_train.jsonl").read_text().splitlines()[:n]
    items = [json.loads(line) for line in lines]
    path = tmp_path / "prontoqa_pc.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i['question']} {i['query']}\nAnswer:",
                                        "completion": f" {i['answer']}"}) + "\n" for i in items))
    return path


def test_gemma_labels_the_answer_and_eos_only_after_one_bos(gemma, tmp_path):
    _, tok = gemma
    prompt, completion = "Polly is a jompus. Jompuses are overcast. True or false: Polly is overcast.\nAnswer:", " True"
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    data = build_data(tok, [str(path)], None, seq_len=40, train_rows=1, valid_rows=0, val_fraction=0.0)
    inputs, labels = split_row(data.train, data.bos)
    prompt_ids = tok(prompt)["input_ids"]  # as a generation from the prompt sees it: BOS first
    assert prompt_ids[0] == tok.bos_token_id == 2 and tok.bos_token_id not in prompt_ids[1:]
    answer = tok(completion, add_special_tokens=False)["input_ids"]
    assert answer == [6288]  # " True", one token
    n = len(prompt_ids)
    assert inputs[0, : n + 1].tolist() == prompt_ids + answer
    assert labels[0].tolist() == [IGNORE_INDEX] * (n - 1) + answer + [tok.eos_token_id] + [IGNORE_INDEX] * (40 - n - 1)


def test_gemma_base_has_no_template_and_a_template_file_supervises_the_model_turns(gemma, tmp_path):
    _, tok = gemma
    assert tok.chat_template is None
    path = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"},
             {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome"}]
    path.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(SFTDataError, match="--chat-template FILE"):
        build_data(tok, [str(path)], None, seq_len=64, train_rows=1, valid_rows=0, val_fraction=0.0)
    template = tmp_path / "gemma.jinja"
    template.write_text(GEMMA_TEMPLATE)
    data = build_data(tok, [str(path)], None, seq_len=64, train_rows=1, valid_rows=0, val_fraction=0.0,
                      chat_template=str(template))
    inputs, labels = split_row(data.train, data.bos)
    real = inputs[0][data.train[0, :-1] != -1].tolist()
    assert real[0] == 2 and 2 not in real[1:]  # the template's BOS, not doubled
    assert tok.decode(real).startswith("<bos><start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n")
    supervised = [(i, t) for i, t in enumerate(labels[0].tolist()) if t != IGNORE_INDEX]
    turn = tok("Paris<end_of_turn>\n", add_special_tokens=False)["input_ids"]
    assert [t for _, t in supervised] == turn + tok("Rome<end_of_turn>\n", add_special_tokens=False)["input_ids"]
    first = supervised[0][0]  # the position that predicts "Paris" reads the generation prompt's last token
    assert tok.decode(real[: first + 1]).endswith("<start_of_turn>model\n")


def test_two_sft_steps_on_prontoqa_answers(gemma, data_dir, tmp_path, capsys):
    torch.set_num_threads(1)
    base, tok = gemma
    path = prontoqa(data_dir, tmp_path, 40)
    cfg = TrainConfig.of(model="gemma-3-270m", out=str(tmp_path / "run"), data=str(path), encoder_layers=4,
                         decoder_layers=2, seq_len=64, batch_size=2, max_steps=2, lr=1e-4, val_tokens=8 * 64,
                         val_fraction=0.25, long_examples="truncate_prompt", eval_loops=[1, 2], progress=False,
                         tensorboard=False, save_every=0, ce_chunk=64)
    trainer = Trainer(cfg, model=copy.deepcopy(base), tokenizer=tok)
    report = trainer.data.report[str(path)]
    assert report["format"] == "prompt_completion" and report["truncated"] > 0  # ProntoQA prompts exceed 64 tokens
    history = trainer.train()
    assert f"{report['truncated']} truncated from the left of the prompt" in capsys.readouterr().out
    # validation scores the answer and its EOS only: two tokens per held-out example
    for n in ("1", "2"):
        assert history["before"][n]["tokens"] == history["after"][n]["tokens"] == 2 * report["valid_examples"]
        assert torch.isfinite(torch.tensor(history["after"][n]["loss"]))
    log = [json.loads(line) for line in (tmp_path / "run" / "logs" / "train.jsonl").read_text().splitlines()]
    steps = [r for r in log if "lm" in r]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(r["lm"])) for r in steps)
