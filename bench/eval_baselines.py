"""Baselines: the base Gemma 3 270M on every shipped lm-eval task, `--model hf` side by side with
`--model loopus` (the same checkpoint converted, num_loops=1; with one loop LoopUS computes exactly
the base model, so the two columns must agree).

    python bench/eval_baselines.py --out runs/baselines            # stated --limit per task (CPU)
    python bench/eval_baselines.py --full --out runs/baselines     # full sets (GPU)

Equivalent CLI for one cell (what the table reports):
    loopus lm-eval --model hf --model_args pretrained=~/.cache/loopus/base/gemma-3-270m,dtype=float32 \
        --tasks arc_easy --limit 50 --batch_size 8
    loopus lm-eval --model loopus --model_args pretrained=runs/baselines/loopus-1loop,num_loops=1 \
        --tasks arc_easy --limit 50 --batch_size 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# CPU limits (documents per task; for mmlu: per subject). None = full set.
CPU_LIMITS = {
    "arc_easy": 20,
    "arc_challenge": 20,
    "piqa": 20,
    "hellaswag": 10,
    "lambada_openai": 20,
    "wikitext": 1,
    "mmlu": 1,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/baselines")
    p.add_argument("--full", action="store_true", help="full sets (no --limit)")
    p.add_argument("--tasks", default=",".join(CPU_LIMITS))
    p.add_argument("--models", default="loopus,hf")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    args = p.parse_args()

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    import loopus
    from loopus.eval import task_manager
    from loopus.eval.lm_eval_model import LoopUSLM
    from loopus.eval.report import flatten_results
    from loopus.zoo import load_base, resolve

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base_dir = resolve("gemma-3-270m")
    loop_dir = out / "loopus-1loop"
    if not (loop_dir / "config.json").exists():
        base, tok = load_base(base_dir)
        loopus.convert(base, 2, 1).save_pretrained(loop_dir)
        tok.save_pretrained(loop_dir)
    tm = task_manager()
    tasks = args.tasks.split(",")
    results: dict = {"limits": {t: (None if args.full else CPU_LIMITS.get(t)) for t in tasks}, "models": {}}
    path = out / "baselines.json"
    for name in args.models.split(","):
        if name == "hf":
            lm = HFLM(pretrained=str(base_dir), dtype="float32", batch_size=args.batch_size, device=device)
        else:
            lm = LoopUSLM(pretrained=str(loop_dir), num_loops=1, batch_size=args.batch_size, device=device)
        results["models"][name] = {}
        for task in tasks:
            start = time.time()
            r = simple_evaluate(model=lm, tasks=[task], limit=results["limits"][task], task_manager=tm)
            metrics = flatten_results(r)
            results["models"][name][task] = {"metrics": metrics.get(task, {}), "seconds": round(time.time() - start, 1)}
            print(name, task, results["models"][name][task], flush=True)
            path.write_text(json.dumps(results, indent=2))
    print(f"written {path}")


if __name__ == "__main__":
    main()
