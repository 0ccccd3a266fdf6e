"""Issue 11, item 5: adaptive exit on a *trained* LoopUS model, against fixed budgets of 4 and 8 loops.

Held-out text is predicted one token at a time through the KV cache (teacher forcing), so a token
exits exactly as it would while generating. Windows are BOS-led pieces of held-out documents
(enwiki and ELTeC validation files). For each rule: mean reasoning passes per token and perplexity,
and the cost of the constant-memory KV mode (`kv_mode="shared"`) at the fixed budget.

    python bench/exit_trained.py runs/recipes/fp --tokens 2048 --out docs/results/exit_trained.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from loopus.eval.scoring import teacher_forced  # the same token-by-token scorer as bench/decode.py

RULES = [  # (label, budget, kv_mode, exit kwargs)
    ("fixed 1", 1, "per_depth", {}),
    ("fixed 2", 2, "per_depth", {}),
    ("fixed 4", 4, "per_depth", {}),
    ("fixed 8", 8, "per_depth", {}),
    ("fixed 8, kv shared", 8, "shared", {}),
    ("fixed 4, kv shared", 4, "shared", {}),
    ("threshold 0.9", 8, "per_depth", {"exit_strategy": "threshold", "exit_threshold": 0.9}),
    ("threshold 0.7", 8, "per_depth", {"exit_strategy": "threshold", "exit_threshold": 0.7}),
    ("cdf 0.9", 8, "per_depth", {"exit_strategy": "cdf", "exit_threshold": 0.9}),
    ("cdf 0.7", 8, "per_depth", {"exit_strategy": "cdf", "exit_threshold": 0.7}),
    ("kl 0.01", 8, "per_depth", {"exit_strategy": "kl", "exit_threshold": 0.01}),
    ("kl 0.05", 8, "per_depth", {"exit_strategy": "kl", "exit_threshold": 0.05}),
    ("convergence 0.05", 8, "per_depth", {"exit_strategy": "convergence", "exit_threshold": 0.05}),
    ("convergence 0.2", 8, "per_depth", {"exit_strategy": "convergence", "exit_threshold": 0.2}),
    ("threshold 0.9, budget 4", 4, "per_depth", {"exit_strategy": "threshold", "exit_threshold": 0.9}),
    ("kl 0.05, budget 4", 4, "per_depth", {"exit_strategy": "kl", "exit_threshold": 0.05}),
    ("cdf 0.9, budget 4", 4, "per_depth", {"exit_strategy": "cdf", "exit_threshold": 0.9}),
    ("convergence 0.05, budget 4", 4, "per_depth", {"exit_strategy": "convergence", "exit_threshold": 0.05}),
]


def windows(tokenizer, data: str | None, tokens: int, window: int) -> list[torch.Tensor]:
    """BOS-led windows from the start of the held-out documents, `tokens` label tokens per corpus."""
    from loopus.eval.perplexity import held_out_documents

    out = []
    for corpus in ("enwiki", "eltec_eng"):
        left = tokens
        for doc in held_out_documents(corpus, data):
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids) - window + 1, window):
                if left <= 0:
                    break
                out.append(torch.tensor([[tokenizer.bos_token_id] + ids[start : start + window]]))
                left -= window
            if left <= 0:
                break
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a trained LoopUS checkpoint directory")
    p.add_argument("--data", default=None)
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens per corpus")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--rules", default=None, help="rule labels to run, separated by semicolons (labels hold commas; default: all)")
    p.add_argument("--out", default="runs/exit_trained.json",
                   help="report file; rules already in it for the same model and windows are kept")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import loopus  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pieces = windows(tokenizer, args.data, args.tokens, args.window)
    chosen = [r for r in RULES if args.rules is None or r[0] in [x.strip() for x in args.rules.split(";")]]
    report = {"model": args.model, "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "tokens": sum(x.shape[1] - 1 for x in pieces), "window": args.window, "rules": {}}
    report["rules"] = earlier_rules(Path(args.out), report)
    for label, budget, kv_mode, kwargs in chosen:
        nll, count, passes = 0.0, 0, 0.0
        start = time.time()
        for ids in pieces:
            r = teacher_forced(model, ids, 1, budget, kv_mode, **kwargs)
            nll += math.log(r["ppl"]) * r["tokens"]
            count += r["tokens"]
            passes += r["mean_passes"] * (r["tokens"] - 1)
        entry = {"ppl": math.exp(nll / count), "mean_passes": passes / (count - len(pieces)), "budget": budget,
                 "kv_mode": kv_mode, **kwargs, "wall_s": time.time() - start}
        report["rules"][label] = entry
        print(f"{label:28s} ppl {entry['ppl']:.3f}  passes {entry['mean_passes']:.2f}", flush=True)
        write_report(report, Path(args.out))  # after every rule: a long run stopped early keeps what it measured
    return 0


def earlier_rules(path: Path, report: dict) -> dict:
    """The rules an earlier run wrote to `path` for the same model and windows: a later run with other
    `--rules` adds to them instead of overwriting them."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    same = all(earlier.get(k) == report[k] for k in ("model", "tokens", "window"))
    return earlier["rules"] if same else {}


def write_report(report: dict, path: Path) -> None:
    fixed = report["rules"].get("fixed 8")
    if fixed:
        for entry in report["rules"].values():
            entry["ppl_cost_vs_fixed8"] = entry["ppl"] / fixed["ppl"] - 1
            entry["passes_saved_vs_fixed8"] = 1 - entry["mean_passes"] / 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
