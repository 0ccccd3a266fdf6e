"""What answer-only supervision saves: a training step on SFT rows (short answers) against LM rows of the
same tokens, on the real Gemma 3 270M.

    python bench/sft_speed.py --out docs/results/sft_speed.json     # data from $LOOPUS_DATA (or --data DIR)

The SFT rows are ProntoQA 1-hop items as prompt/completion (answer " True"/" False" and EOS), built by
`loopus.train.data.build_data`, prompts cut from the left so that every row is full. The LM rows are
the same tokens with every position labelled. The chunked cross entropy projects to the 262k-entry
vocabulary only at labelled positions, so the SFT step skips the head almost everywhere. Both the
dense step and an RDS step (LoopUS split 4/2, one fixed plan) are timed; SFT and LM steps alternate,
so load on a shared machine hits both alike, and the ratio is of the summed step times.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import loopus
from loopus.train.data import build_data, split_row
from loopus.train.sources import INPUT_ONLY
from loopus.train.objective import RDSPlan, dense_step, rds_step
from loopus.train.params import apply_freeze
from loopus.paths import data_path
from loopus.zoo import load_base


def sft_and_lm_batches(tokenizer, data_dir: Path, batch: int, seq: int):
    """(inputs, SFT labels, LM labels) of `batch` full rows of ProntoQA prompt/completion examples."""
    items = [json.loads(line) for line in (data_dir / "prontoqa" / "1hop_train.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prontoqa.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"{i['question']} {i['query']}\nAnswer:",
                                            "completion": f" {i['answer']}"}) + "\n" for i in items[: 8 * batch]))
        data = build_data(tokenizer, [str(path)], None, seq, 8 * batch, 0, val_fraction=0.0,
                          long_examples="truncate_prompt")
    rows = data.train[(data.train != -1).all(1)][:batch]  # full rows: no padding in either batch
    if rows.shape[0] < batch:
        raise ValueError(f"fewer than {batch} full rows of {seq + 1} tokens: lower --seq")
    inputs, sft_labels = split_row(rows, data.bos)
    _, lm_labels = split_row(torch.where(rows <= INPUT_ONLY, INPUT_ONLY - rows, rows), data.bos)
    return inputs, sft_labels, lm_labels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="data directory holding prontoqa/ (default: $LOOPUS_DATA)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dense, tokenizer = load_base("gemma-3-270m")
    dense = dense.train().to(device)
    apply_freeze(dense, {"embeddings", "encoder"}, 4, 0)
    looped = loopus.convert(load_base("gemma-3-270m")[0], 4, 2).train().to(device)
    apply_freeze(looped, {"embeddings", "encoder"})
    inputs, sft_labels, lm_labels = (t.to(device) for t in sft_and_lm_batches(tokenizer, data_path(args.data),
                                                                              args.batch, args.seq))
    plan = RDSPlan(3, (1, 3))
    steps = {"dense": lambda labels: dense_step(dense, inputs, labels),
             "loopus": lambda labels: rds_step(looped, inputs, labels, plan)}

    def timed(step, labels) -> float:
        for model in (dense, looped):
            model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(labels)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    result = {"model": "gemma-3-270m", "device": device, "threads": args.threads, "batch": args.batch,
              "seq": args.seq, "plan": [plan.horizon, list(plan.supervised)],
              "labelled_positions": {"sft": int((sft_labels != -100).sum()), "lm": int((lm_labels != -100).sum())}}
    tokens = args.batch * args.seq
    for name, step in steps.items():
        timed(step, lm_labels)  # warm-up
        times = {"sft": [], "lm": []}
        for _ in range(args.repeats):
            times["sft"].append(timed(step, sft_labels))
            times["lm"].append(timed(step, lm_labels))
        result[name] = {"sft_s": times["sft"], "lm_s": times["lm"],
                        "sft_tokens_per_s": tokens * args.repeats / sum(times["sft"]),
                        "lm_tokens_per_s": tokens * args.repeats / sum(times["lm"]),
                        "speedup": sum(times["lm"]) / sum(times["sft"])}
    print(json.dumps(result, indent=1))
    for name in steps:
        r = result[name]
        print(f"{name}: SFT rows {r['sft_tokens_per_s']:.1f} tok/s, LM rows {r['lm_tokens_per_s']:.1f} tok/s, "
              f"SFT/LM {r['speedup']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
