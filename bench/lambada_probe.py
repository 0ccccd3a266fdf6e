"""Where does post-training lose LAMBADA? Per-passage target log-probabilities, base against trained models.

LAMBADA (lm-eval's `lambada_openai`) scores the last word of a passage given the rest. `make run` and the
recipe study found its perplexity doubling after short training runs that leave held-out enwiki level.
This scores the same passages as lm-eval does (context with the tokenizer's BOS, continuation " word")
and splits them by whether the target word already occurs in the context (copying from the passage,
what LAMBADA was built to test) or not, and by whether the context is longer than the training rows,
and lists the top predictions where the trained model fails.

    python bench/lambada_probe.py runs/recipes/dense runs/recipes/fp --limit 200
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from loopus.looped import LoopedModel


def target_logprobs(model, tokenizer, passages: list[str]) -> list[dict]:
    """Sum log-prob, greedy hit and the model's top-1 first token for each passage's last word."""
    one_loop = {"num_loops": 1, "use_cache": False} if isinstance(model, LoopedModel) else {}
    out = []
    for text in passages:
        context, word = text.rsplit(" ", 1)
        ctx_ids = tokenizer(context)["input_ids"]
        cont_ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx_ids + cont_ids])
        with torch.no_grad():
            logits = model(ids, **one_loop).logits[0, len(ctx_ids) - 1 : -1].float()
        logprobs = torch.log_softmax(logits, -1)
        target = torch.tensor(cont_ids)
        out.append({
            "logprob": float(logprobs.gather(1, target[:, None]).sum()),
            "greedy": bool((logprobs.argmax(-1) == target).all()),
            "top1": tokenizer.decode([int(logprobs[0].argmax())]),
            "copy": word.lower() in context.lower(),
            "context_tokens": len(ctx_ids),
            "word": word,
        })
    return out


def induction_nll(model, bos: int, vocab: int, length: int = 48, trials: int = 16) -> tuple[float, float]:
    """Mean NLL on the first and on the second copy of a random token sequence repeated once, BOS-led:
    the second copy is predictable only by copying from the context (induction)."""
    generator = torch.Generator().manual_seed(0)
    one_loop = {"num_loops": 1, "use_cache": False} if isinstance(model, LoopedModel) else {}
    first, second = 0.0, 0.0
    for _ in range(trials):
        seq = torch.randint(1000, vocab, (length,), generator=generator)
        ids = torch.cat([torch.tensor([bos]), seq, seq])[None]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids, **one_loop).logits[0, :-1].float(), -1)
        nll = -logprobs.gather(1, ids[0, 1:, None]).squeeze(1)
        first += float(nll[:length].mean()) / trials
        second += float(nll[length:].mean()) / trials
    return first, second


def summary(rows: list[dict]) -> dict:
    if not rows:
        return {"n": 0}
    mean = sum(r["logprob"] for r in rows) / len(rows)
    return {"n": len(rows), "ppl": math.exp(-mean), "acc": sum(r["greedy"] for r in rows) / len(rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="trained checkpoint directories (LoopUS ones run at one loop)")
    p.add_argument("--base", default="gemma-3-270m")
    p.add_argument("--data", default=None)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--train-seq", type=int, default=128, help="the training rows' length: contexts are split at it")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    import loopus  # noqa: F401  (registers LoopUS checkpoints)
    from loopus.paths import data_file
    from loopus.text import read_jsonl_texts
    from loopus.zoo import load_base

    passages = list(read_jsonl_texts(data_file("lambada_openai/lambada_test.jsonl", args.data), "text"))[: args.limit]
    base, tokenizer = load_base(args.base)
    models = {"base": base.eval()}
    for path in args.models:
        models[Path(path).name] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    scores, report = {}, {}
    for name, model in models.items():
        scores[name] = target_logprobs(model, tokenizer, passages)
        first, second = induction_nll(model, tokenizer.bos_token_id, len(tokenizer))
        print(f"{name:10s} induction: NLL {first:.2f} on random tokens, {second:.2f} on their repeat")
        report[name] = {"induction_nll": {"first": first, "repeat": second}}
    for name, rows in scores.items():
        report[name] |= {"all": summary(rows), "copy": summary([r for r in rows if r["copy"]]),
                        "no_copy": summary([r for r in rows if not r["copy"]]),
                        f"context<={args.train_seq}": summary([r for r in rows if r["context_tokens"] <= args.train_seq]),
                        f"context>{args.train_seq}": summary([r for r in rows if r["context_tokens"] > args.train_seq])}
        print(f"{name:10s} " + "  ".join(f"{k}: n={v['n']} ppl {v.get('ppl', float('nan')):.2f} "
                                          f"acc {v.get('acc', float('nan')):.3f}" for k, v in report[name].items()
                                          if k != "induction_nll"))
    for name in list(scores)[1:]:
        lost = [(b, r) for b, r in zip(scores["base"], scores[name]) if b["greedy"] and not r["greedy"]]
        drops = sorted(((b["logprob"] - r["logprob"], b, r) for b, r in zip(scores["base"], scores[name])),
                       key=lambda x: -x[0])
        print(f"{name}: {len(lost)} passages right for the base and wrong after training; largest drops "
              "(target: base top-1 -> trained top-1, nats):")
        for d, b, r in drops[:12]:
            print(f"  {b['word']!r:16s} {b['top1']!r:>12s} -> {r['top1']!r:12s} {d:+.2f}  copy={b['copy']}")
        report[name]["lost"] = len(lost)
        report[name]["mean_drop_nats"] = sum(d for d, _, _ in drops) / len(drops)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
