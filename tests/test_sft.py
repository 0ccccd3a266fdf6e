"""Supervised fine-tuning: formats, answer-only labels token by token, BOS, long examples, masking in every
loss term, padded rows, end to end per format, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import processors

from loopus.cli import main as cli_main
from loopus.text import IGNORE_INDEX
from loopus.train import TrainConfig, Trainer
from loopus.train.checkpointing import list_checkpoints
from loopus.train.data import build_data, split_row
from loopus.train.objective import RDSConfig, RDSPlan, rds_step
from loopus.train.sft import SFTDataError
from conftest import char_tokenizer, tiny_base, tiny_looped
from test_train_helpers import kill_inside_step, tiny_loopus
from test_train_trainer import tiny_dir  # noqa: F401  (a fixture: a tiny base model directory)

torch.set_num_threads(1)

# a chat template for the character tokenizer: "role: content<eos>\n" per message, BOS first
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def chat_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def chars(tok, text: str) -> list[int]:
    """Ids of `text`, one per character (the character tokenizer), written out without the tokenizer's call."""
    return [tok.convert_tokens_to_ids(c) for c in text]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pc_records(n=40):
    return [{"prompt": f"what is {i} plus {i}? ", "completion": f"{2 * i}"} for i in range(n)]


def chat_records(n=40):
    return [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": f"{i}!"}]}
            for i in range(n)]


def rows_of(tok, path, seq_len=48, **kwargs):
    return build_data(tok, [str(path)], None, seq_len=seq_len, train_rows=kwargs.pop("train_rows", 4),
                      valid_rows=kwargs.pop("valid_rows", 1), **kwargs)


def expected_row(ids: list[int], supervised: list[bool], seq_len: int) -> tuple[list[int], list[int]]:
    """(inputs, labels) a row of this example must give: labels only where supervised, padding ignored."""
    inputs = (ids + [0] * (seq_len + 1 - len(ids)))[:-1]
    labels = [t if s else IGNORE_INDEX for t, s in zip(ids[1:], supervised[1:])]
    return inputs, labels + [IGNORE_INDEX] * (seq_len - len(labels))


def test_prompt_completion_labels_only_the_completion_and_eos(tmp_path):
    tok = char_tokenizer()
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}] * 3)
    data = rows_of(tok, path, seq_len=12, val_fraction=0.0)
    assert data.report[str(path)] == {"format": "prompt_completion", "examples": 3, "valid_examples": 0,
                                      "truncated": 0}
    inputs, labels = split_row(data.train[:1], data.bos)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids = [bos] + chars(tok, "2+2=") + chars(tok, "4") + [eos]
    want = expected_row(ids, [False] * 5 + [True, True], 12)
    assert inputs[0].tolist() == want[0] and labels[0].tolist() == want[1]
    assert labels[0].tolist()[:6] == [IGNORE_INDEX] * 4 + [chars(tok, "4")[0], eos]


def test_conversation_labels_every_assistant_turn_through_its_end_of_turn(tmp_path):
    tok = chat_tokenizer()
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(1))
    data = rows_of(tok, path, seq_len=64, val_fraction=0.0, train_rows=1)
    inputs, labels = split_row(data.train, data.bos)
    eos = tok.eos_token_id
    pieces = [("user: say 0", False), ("<eos>", False), ("\nassistant: ", False), ("0", True), ("<eos>", True),
              ("\n", True), ("user: again", False), ("<eos>", False), ("\nassistant: ", False), ("0!", True),
              ("<eos>", True), ("\n", True)]
    ids, supervised = [tok.bos_token_id], [False]
    for text, flag in pieces:
        piece = [eos] if text == "<eos>" else chars(tok, text)
        ids += piece
        supervised += [flag] * len(piece)
    want = expected_row(ids, supervised, 64)
    assert inputs[0].tolist() == want[0] and labels[0].tolist() == want[1]
    assert tok.decode([t for t in labels[0].tolist() if t >= 0]) == "0<eos>\n0!<eos>\n"


def test_conversational_prompt_completion_supervises_the_completion_only(tmp_path):
    tok = chat_tokenizer()
    record = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                         {"role": "user", "content": "and?"}],
              "completion": [{"role": "assistant", "content": "ok"}]}
    data = rows_of(tok, write_jsonl(tmp_path / "cpc.jsonl", [record]), seq_len=64, val_fraction=0.0, train_rows=1)
    _, labels = split_row(data.train, data.bos)
    assert tok.decode([t for t in labels[0].tolist() if t >= 0]) == "ok<eos>\n"


def test_bos_is_where_the_tokenizer_puts_it_and_never_doubled(tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", pc_records(2))
    with_bos = rows_of(char_tokenizer(), pc, val_fraction=0.0, train_rows=2)
    assert (split_row(with_bos.train, None)[0][:, 0] == 1).all()  # <bos>, once
    assert (split_row(with_bos.train, None)[0][:, 1] != 1).all()
    # the template writes the BOS itself: it is not added again
    chat = rows_of(chat_tokenizer(), write_jsonl(tmp_path / "c.jsonl", chat_records(2)), val_fraction=0.0,
                   train_rows=2, seq_len=64)
    inputs = split_row(chat.train, None)[0]
    assert (inputs[:, 0] == 1).all() and (inputs[:, 1:] != 1).all()
    # a tokenizer that starts a sequence with nothing: no BOS
    bare = char_tokenizer()
    bare.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    assert bare("ab")["input_ids"] == chars(bare, "ab")
    rows = rows_of(bare, pc, val_fraction=0.0, train_rows=2)
    inputs, labels = split_row(rows.train, None)
    assert inputs[0, :5].tolist() == chars(bare, "what ")
    assert (inputs != 1).all()


def test_a_tokenizer_without_a_template_names_the_option_and_a_template_file_works(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(3))
    with pytest.raises(SFTDataError, match=r"chat.jsonl:1: .*has none.*--chat-template FILE"):
        rows_of(char_tokenizer(), path, seq_len=64)
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    data = rows_of(char_tokenizer(), path, seq_len=64, val_fraction=0.0, chat_template=str(template), train_rows=3)
    assert torch.equal(data.train, rows_of(chat_tokenizer(), path, seq_len=64, val_fraction=0.0, train_rows=3).train)
    # prompt/completion needs no template
    assert rows_of(char_tokenizer(), write_jsonl(tmp_path / "pc.jsonl", pc_records(3))).train.shape[0] == 3


def test_bad_records_are_refused_with_their_line(tmp_path):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", pc_records(2) + [{"text": "plain"}])
    with pytest.raises(SFTDataError, match=r"mixed.jsonl:3: no 'prompt' and 'completion' field"):
        rows_of(char_tokenizer(), mixed, val_fraction=0.0)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "a", "completion": 3}])
    with pytest.raises(SFTDataError, match=r"odd.jsonl:1: 'prompt' and 'completion' must both be strings"):
        rows_of(char_tokenizer(), odd, val_fraction=0.0)
    pc = write_jsonl(tmp_path / "pc.jsonl", pc_records(2))
    for packing in ({"packing": "stream"}, {"rows_per_doc": 1}):
        with pytest.raises(ValueError, match="is SFT data \\(prompt_completion\\), one example per row"):
            rows_of(char_tokenizer(), pc, **packing)
    silent = write_jsonl(tmp_path / "silent.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(SFTDataError, match=r"silent.jsonl:1: no assistant message"):
        rows_of(chat_tokenizer(), silent, val_fraction=0.0)


def test_long_examples_are_refused_with_their_lines_or_truncated_from_the_prompts_left(tmp_path):
    tok = char_tokenizer()
    records = [{"prompt": "short? ", "completion": "ok"}, {"prompt": "a much longer prompt here? ", "completion": "ok"}]
    path = write_jsonl(tmp_path / "long.jsonl", records * 2)
    with pytest.raises(SFTDataError, match=r"2 SFT example\(s\) .*long.jsonl:2, .*long.jsonl:4; the longest has "
                                           r"31 tokens\): raise --seq-len, or pass --long-examples truncate_prompt"):
        rows_of(tok, path, seq_len=16, val_fraction=0.0)
    data = rows_of(tok, path, seq_len=16, val_fraction=0.0, long_examples="truncate_prompt")
    assert data.report[str(path)]["truncated"] == 2
    inputs, labels = split_row(data.train[1:2], data.bos)
    # BOS kept, the prompt's first 14 tokens dropped, the completion whole
    ids = [tok.bos_token_id] + chars(tok, "a much longer prompt here? "[14:]) + chars(tok, "ok") + [tok.eos_token_id]
    assert len(ids) == 17
    want = expected_row(ids, [False] * 14 + [True] * 3, 16)
    assert inputs[0].tolist() == want[0] and labels[0].tolist() == want[1]
    # a completion that alone does not fit cannot be truncated
    huge = write_jsonl(tmp_path / "huge.jsonl", [{"prompt": "q", "completion": "x" * 40}])
    with pytest.raises(SFTDataError, match=r"huge.jsonl:1; the longest has 43 tokens\): even without their prompts"):
        rows_of(tok, huge, seq_len=16, val_fraction=0.0, long_examples="truncate_prompt")


def test_validation_holds_out_whole_examples_with_the_same_masking(tmp_path):
    tok = char_tokenizer()
    path = write_jsonl(tmp_path / "pc.jsonl", pc_records(200))
    data = rows_of(tok, path, train_rows=1000, valid_rows=50, val_fraction=0.2)
    report = data.report[str(path)]
    assert report["examples"] + report["valid_examples"] == 200 and 20 <= report["valid_examples"] <= 50
    as_rows = lambda t: {tuple(r) for r in t.tolist()}  # noqa: E731
    assert not as_rows(data.train) & as_rows(data.valid)
    for rows in (data.train, data.valid):
        inputs, labels = split_row(rows, data.bos)
        for row_inputs, row_labels in zip(inputs, labels):
            text = tok.decode(row_inputs[row_inputs > 0])
            answer = text.split("? ")[1].replace("<eos>", "")
            assert tok.decode([t for t in row_labels.tolist() if t >= 0]) == answer + "<eos>"
    # a valid file is used as it is
    folder = tmp_path / "qa"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", pc_records(10))
    write_jsonl(folder / "valid.jsonl", [{"prompt": "held? ", "completion": "out"}])
    split = build_data(tok, ["qa"], str(tmp_path), seq_len=32, train_rows=10, valid_rows=5)
    assert split.train.shape[0] == 10 and split.valid.shape[0] == 1
    assert tok.decode(split_row(split.valid, None)[0][0, :6]) == "<bos>held?"


def test_every_loss_term_ignores_unsupervised_positions():
    """With the last position's label ignored, changing the last input token changes nothing: no loss term
    (LM, monotonicity, confidence target or head) and no gradient reads it. Supervised, it changes them."""
    cfg = RDSConfig(beta_mono=1.0, lambda_conf=1.0, conf_margin=0.5)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(4, 97, (2, 12), generator=g)
    labels = torch.randint(4, 97, (2, 12), generator=g)
    labels[:, :5] = IGNORE_INDEX  # a prompt

    def run(ids, lab):
        model = tiny_looped("gemma3_text").train()
        torch.manual_seed(1)
        torch.nn.init.normal_(model.confidence_head.proj.weight)  # a head that reads the state
        metrics = rds_step(model, ids, lab, RDSPlan(3, (1, 2, 3)), cfg)
        return metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    changed = inputs.clone()
    changed[:, -1] = (inputs[:, -1] + 7) % 97
    masked = labels.clone()
    masked[:, -1] = IGNORE_INDEX
    (m1, g1), (m2, g2) = run(inputs, masked), run(changed, masked)
    assert m1["mono"] > 0 and 0 < m1["conf_target"] < 1  # every term is live
    assert m1 == m2
    assert g1.keys() == g2.keys() and any("confidence" in n for n in g1)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
    # control: supervised, the last position moves the losses
    (m3, _), (m4, _) = run(inputs, labels), run(changed, labels)
    assert m3["lm@1"] != m4["lm@1"] and m3["conf"] != m4["conf"]


@pytest.mark.parametrize("model", ["looped", "base"])
def test_padded_rows_compute_what_each_example_computes_alone(tmp_path, model):
    tok = chat_tokenizer()
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(12)[6:] + chat_records(2))
    data = rows_of(tok, path, seq_len=64, val_fraction=0.0, train_rows=8)
    net = tiny_looped("gemma3_text") if model == "looped" else tiny_base("gemma3_text")
    inputs, _ = split_row(data.train, data.bos)
    lengths = (data.train[:, :-1] != -1).sum(1)
    assert len(set(lengths.tolist())) > 1 and (lengths < 64).all()
    with torch.no_grad():
        together = net(inputs).logits
        for row, n in zip(range(inputs.shape[0]), lengths.tolist()):
            alone = net(inputs[row : row + 1, :n]).logits[0]
            # equal up to float rounding: the kernels of other shapes sum in another order (measured 2e-7)
            torch.testing.assert_close(together[row, :n], alone, rtol=0, atol=1e-6)


def sft_config(out, data, **overrides):
    values = dict(model="unused", out=str(out), data=str(data), seq_len=64, batch_size=2, grad_accum=2, max_steps=6,
                  lr=1e-2, horizon_min=1, horizon_max=3, supervised_min=1, supervised_max=2, eval_loops=[1, 2],
                  eval_at_start=False, eval_at_end=False, progress=False, tensorboard=False, save_every=2,
                  depth_lora_rank=0, freeze=["embeddings", "encoder"], val_tokens=256)
    values.update(overrides)
    return TrainConfig.of(**values)


def test_sft_resume_is_bit_identical(tmp_path):
    tok = chat_tokenizer()
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    straight = Trainer(sft_config(tmp_path / "a", path), model=tiny_loopus("llama"), tokenizer=tok)
    straight.train()
    killed = Trainer(sft_config(tmp_path / "b", path), model=tiny_loopus("llama"), tokenizer=tok)

    kill_inside_step(killed, 4, 3)
    assert [p.name for p in list_checkpoints(tmp_path / "b")][:2] == ["step-00000002", "step-00000004"]
    resumed = Trainer(sft_config(tmp_path / "b", path, resume=True), model=tiny_loopus("llama"), tokenizer=tok)
    resumed.train()
    a, b = straight.core.state_dict(), resumed.core.state_dict()
    assert resumed.step == straight.step == 6 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", ["prompt_completion", "messages", "text"])
@pytest.mark.parametrize("mode", ["loopus", "dense"])
def test_cli_trains_on_each_format(tmp_path, tiny_dir, capsys, fmt, mode):
    records = {"prompt_completion": pc_records(), "messages": chat_records(),
               "text": [{"text": f"plain text number {i}."} for i in range(40)]}[fmt]
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", records)
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--mode", mode,
            "--encoder-layers", "1", "--decoder-layers", "1", "--max-steps", "2", "--seq-len", "64",
            "--batch-size", "2", "--val-tokens", "128", "--val-fraction", "0.2", "--progress", "false",
            "--tensorboard", "false", "--chat-template", str(template)]
    code = cli_main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert printed["steps"] == 2 and all(v == v for r in printed["valid_loss"].values() for v in r.values())
    log = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    sft = [r for r in log if r.get("event") == "sft_data"]
    if fmt == "text":
        assert not sft and "SFT data" not in captured.out
    else:
        assert sft and sft[0]["format"] == fmt and sft[0]["truncated"] == 0
        assert f"SFT data {data}: {fmt}, " in captured.out and "0 truncated" in captured.out
    # the model is saved with the template it was trained through
    assert json.loads((out / "tokenizer_config.json").read_text()).get("chat_template") == TEMPLATE or \
        (out / "chat_template.jinja").read_text() == TEMPLATE


def test_cli_refuses_long_examples_in_one_line(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "pc.jsonl", pc_records(4) + [{"prompt": "x" * 80, "completion": "y"}])
    args = ["train", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "run"), "--mode", "dense",
            "--max-steps", "3", "--batch-size", "2", "--seq-len", "32", "--progress", "false", "--val-fraction", "0"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("loopus train: error: 1 SFT example(s)") and "pc.jsonl:5;" in err
    assert cli_main(args + ["--long-examples", "truncate_prompt", "--out", str(tmp_path / "cut")]) == 0
    assert "1 truncated from the left of the prompt" in capsys.readouterr().out


def test_sft_on_two_processes_replicated_and_fsdp_take_the_same_steps(tmp_path, tiny_dir):
    from test_train_trainer import assert_same_training, launch_two_processes

    folder = tmp_path / "data" / "tiny"
    folder.mkdir(parents=True)
    arithmetic = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(10) for b in range(10)]
    write_jsonl(folder / "train.jsonl", arithmetic[:90])
    write_jsonl(folder / "valid.jsonl", arithmetic[90:])
    replicated, sharded = tmp_path / "replicated", tmp_path / "fsdp"
    launch_two_processes(replicated, tmp_path / "data", tiny_dir)
    launch_two_processes(sharded, tmp_path / "data", tiny_dir, "--fsdp", "true")
    assert_same_training(replicated, sharded, tiny_dir, prefix="base.")
    log = [json.loads(line) for line in (sharded / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["format"] for r in log if r.get("event") == "sft_data"] == ["prompt_completion"]
