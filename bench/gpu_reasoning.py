"""The reasoning study's GPU run: a LoopUS recipe against the dense SFT, at equal tokens, on two tasks where
answers need depth: `mult_5x5` (answer only, generated training products, the test pairs kept out) and
`gsm8k_nocot` (the data directory's train split), in bf16, within a training-time budget.

Per task, both arms train on the same packed rows in the same order (one `PackedData`, one seed), at the
same batch and the same number of optimiser steps, so at equal tokens. The step count comes from a short
speed probe of the looped arm (the slower one): the budget (`--train-minutes`, all four runs together) is
split evenly over the runs, and the looped run's share at its probed speed fixes the steps of both arms.
Each trained model is then scored by exact match of the generated answer through lm-eval (`--limit`
documents of the task's test split): the LoopUS arm at every `--loops` count, the dense one at its one
depth (it has no loop). OUT/summary.json and OUT/summary.md record accuracy, tokens/s of row positions
(padding included: one example per row) and MFU: the step's matmul FLOPs as loopus.train.flops counts
them, with the 262k-entry head counted only at labelled positions (SFT projects no others), over the
GPU's bf16 peak.

`--fused-ce` computes the loss with Liger's fused linear cross entropy (`pip install liger-kernel`, a GPU
with Triton) instead of the package's checkpointed fp32 chunks; it plugs in through
`Trainer.fused_loss`. The package itself never needs it.

    LOOPUS_DATA=../shared/data python bench/gpu_reasoning.py --out runs/gpu_reasoning     # one GPU: 8 min of training
    LOOPUS_DATA=../shared/data python bench/gpu_reasoning.py --out runs/gpu_reasoning --fused-ce
    python bench/gpu_reasoning.py --out runs/gpu_smoke --tasks mult_5x5 --train-minutes 0.1 --batch-size 2 \\
        --probe-steps 2 --max-steps 2 --limit 4 --loops 1,2 --train-size 64   # CPU check, real Gemma: 71 s
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from gpu_study import free_memory, median_step_s, step_flops
from loopus.train import recipes
from loopus.train.flops import peak_flops
from loopus.train.options import parse_ints

TASKS = {"mult_5x5": (48, 256), "gsm8k_nocot": (192, 64)}  # task: (tokens per row, rows per batch)
DENSE = "dense"
METRIC = "exact_match[strict-match]"


def parse_split(text: str) -> tuple[int, int]:
    try:
        encoder, decoder = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split {text!r}: expected ENCODER,DECODER layers, e.g. 6,3") from None
    return encoder, decoder


def task_data(task: str, out: Path, args: argparse.Namespace, tokenizer):
    """Write the task's SFT files (as `loopus make-task TASK`) and pack them, one example per row: the corpus
    folder and the rows. Prompts longer than a row are cut from the left, and counted."""
    from loopus.tasks.sft import write_sft
    from loopus.train.data import build_data

    corpus = str(write_sft(out / "data", task, args.data, args.seed, args.train_size)["train"].parent)
    seq_len = TASKS[task][0]
    with open(Path(corpus) / "train.jsonl", encoding="utf-8") as f:
        examples = sum(1 for _ in f)
    data = build_data(tokenizer, [corpus], None, seq_len, examples, 1, args.seed, long_examples="truncate_prompt")
    return corpus, data


def labelled_share(data) -> float:
    """The share of row positions that carry a label (the answer tokens and EOS)."""
    from loopus.text import IGNORE_INDEX
    from loopus.train.data import split_row

    _, labels = split_row(data.train, data.bos)
    return float((labels != IGNORE_INDEX).float().mean())


def arm_config(arm: str, task: str, corpus: str, out: Path, args: argparse.Namespace, steps: int, batch: int):
    from loopus.train import TrainConfig

    return TrainConfig.of(
        recipe=arm, model=args.model, encoder_layers=args.split[0], decoder_layers=args.split[1], corpus=[corpus],
        seed=args.seed, out=str(out), seq_len=TASKS[task][0], batch_size=batch, max_steps=steps, lr=args.lr,
        precision=args.precision, long_examples="truncate_prompt", val_tokens=TASKS[task][0], save_every=0,
        eval_at_start=False, eval_at_end=False, tensorboard=False, progress=False)


def sft_flops(cfg, base_config, share: float) -> float:
    """Matmul FLOPs per row position of the arm's step, the head counted at the labelled share of positions."""
    headless = copy.deepcopy(base_config)
    headless.vocab_size = 0
    body = step_flops(cfg, headless)
    return body + share * (step_flops(cfg, base_config) - body)


def liger_loss(model) -> Callable:
    """`Trainer.fused_loss` from Liger's fused linear cross entropy on `model`'s head (soft-capped where
    the model caps its logits): per-token NLL and argmax without the fp32 logits."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    weight = model.get_output_embeddings().weight
    cap = getattr(getattr(model.config, "base_config", model.config), "final_logit_softcapping", None)

    def loss(hidden: torch.Tensor, targets: torch.Tensor, logits_fn) -> tuple[torch.Tensor, ...]:
        out = liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none", softcap=cap,
                                               return_predicted_tokens=True)
        return out.loss.sum(), out.loss.detach(), out.predicted_tokens
    return loss


def train_arm(cfg, base, tokenizer, data, fused: bool) -> tuple[dict, object]:
    """Train one arm; its throughput and the trainer's resolved config."""
    from loopus.train import Trainer

    trainer = Trainer(cfg, model=copy.deepcopy(base), tokenizer=tokenizer, data=data)
    if fused:
        trainer.fused_loss = liger_loss(trainer.core)
    history = trainer.train()
    result = {"tokens": trainer.tokens, "steps": trainer.step, **history["throughput"]}
    return result, trainer.cfg


def score(arm: str, path: Path, task: str, args: argparse.Namespace) -> dict[str, dict]:
    """{loop count: {metric: value}} on the task's test split; the dense model at its one depth ("1")."""
    from loopus.eval.harness import evaluate_hf, evaluate_loopus

    common = {"limit": args.limit, "batch_size": args.eval_batch_size, "data": args.data}
    if arm == DENSE:
        return {"1": evaluate_hf(str(path), [task], **common)[task]}
    loops = evaluate_loopus(str(path), [task], args.loops, **common)["loops"]
    return {str(n): metrics[task] for n, metrics in loops.items()}


def run_task(task: str, out: Path, args: argparse.Namespace, base, tokenizer, seconds: float) -> dict:
    """Probe, train both arms at equal tokens within `seconds` each, score them."""
    from loopus.train import Trainer

    corpus, data = task_data(task, out, args, tokenizer)
    batch = args.batch_size or TASKS[task][1]
    share = labelled_share(data)
    probe = Trainer(arm_config(args.recipe, task, corpus, out / "probe", args, args.probe_steps, batch),
                    model=copy.deepcopy(base), tokenizer=tokenizer, data=data)
    rate = TASKS[task][0] * batch / median_step_s(probe, args.probe_steps)
    probe = None
    free_memory()
    steps = max(1, int(seconds * rate) // (TASKS[task][0] * batch))
    steps = min(steps, args.max_steps) if args.max_steps else steps
    entry = {"seq_len": TASKS[task][0], "batch_size": batch, "examples": int(data.train.shape[0]),
             "truncated": data.report[corpus]["truncated"], "labelled_share": share,
             "probe_tokens_per_s": rate, "steps": steps, "arms": {}}
    peak = peak_flops()
    for arm in (DENSE, args.recipe):
        cfg = arm_config(arm, task, corpus, out / task / arm, args, steps, batch)
        result, resolved = train_arm(cfg, base, tokenizer, data, args.fused_ce)
        free_memory()
        flops = sft_flops(resolved, base.config, share)
        result.update(flops_per_token=flops, mfu=flops * result["tokens_per_s"] / peak if peak else None,
                      scores=score(arm, out / task / arm, task, args))
        entry["arms"][arm] = result
        print(f"[{task} {arm}] {result['tokens']} tokens, {result['tokens_per_s']:.0f} tok/s, "
              + ", ".join(f"{n} loop(s) {s[METRIC]:.3f}" for n, s in result["scores"].items()), flush=True)
    return entry


def markdown(summary: dict) -> str:
    lines = [f"# {summary['recipe']} against dense SFT on {summary['device']}\n",
             f"{summary['date']}; {summary['args']['train_minutes']} training minutes for all runs; "
             f"test documents per task: {summary['args']['limit']}; precision {summary['precision']}; "
             f"fused CE: {summary['args']['fused_ce']}.\n",
             "| task | arm | loops | exact match (strict) ± s.e. | steps | tokens | tokens/s | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for task, entry in summary["tasks"].items():
        for arm, r in entry["arms"].items():
            mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
            for n, s in r["scores"].items():
                err = s.get(METRIC.replace("exact_match", "exact_match_stderr"), float("nan"))
                lines.append(f"| {task} | {arm} | {n} | {s[METRIC]:.3f} ± {err:.3f} | {r['steps']} | {r['tokens']} "
                             f"| {r['tokens_per_s']:.0f} | {mfu} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_reasoning")
    p.add_argument("--data", default=None, help="data directory (default $LOOPUS_DATA)")
    p.add_argument("--model", default="gemma-3-270m", help="base model: embedded name or directory")
    p.add_argument("--recipe", default="default", help="the LoopUS recipe set against dense (loopus.train.recipes)")
    p.add_argument("--split", type=parse_split, default=(6, 3), help="ENCODER,DECODER layers of the looped arm")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--train-minutes", type=float, default=8.0, help="training time of all runs together")
    p.add_argument("--max-steps", type=int, default=None, help="cap on each run's optimiser steps")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default per task: "
                   + ", ".join(f"{t} {b}" for t, (_, b) in TASKS.items()) + ")")
    p.add_argument("--lr", type=float, default=5e-5, help="base learning rate of both arms")
    p.add_argument("--precision", default="auto", help="auto: bf16 autocast on a GPU, fp32 on CPU")
    p.add_argument("--probe-steps", type=int, default=5)
    p.add_argument("--train-size", type=int, default=50_000, help="generated mult_5x5 training products")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loops", type=parse_ints, default=[1, 2, 4, 8], help="loop counts scored for the LoopUS arm")
    p.add_argument("--limit", type=int, default=200, help="test documents per task")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--fused-ce", action="store_true", help="Liger's fused linear cross entropy (GPU, liger-kernel)")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    if unknown := sorted(set(tasks) - set(TASKS)):
        p.error(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    if args.recipe not in recipes.RECIPES or recipes.recipe(args.recipe)["mode"] != "loopus":
        p.error(f"--recipe {args.recipe!r}: choose a LoopUS recipe of {', '.join(recipes.RECIPES)} (not dense)")
    if args.fused_ce:
        try:
            import liger_kernel.transformers.functional  # noqa: F401
        except ImportError as err:
            p.error(f"--fused-ce needs liger-kernel (pip install 'liger-kernel>=0.8.5', on a GPU with Triton): {err}")

    from loopus.train.config import Runtime
    from loopus.zoo import load_base

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    base, tokenizer = load_base(args.model)
    device = Runtime.detect().device
    summary: dict = {"args": vars(args), "recipe": args.recipe, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "torch": torch.__version__, "tasks": {}}
    seconds = args.train_minutes * 60 / (2 * len(tasks))
    for task in tasks:
        summary["tasks"][task] = run_task(task, out, args, base, tokenizer, seconds)
        summary["precision"] = json.loads((out / task / args.recipe / "train_config.json").read_text())["precision"]
        summary["wall_s"] = time.time() - started
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        (out / "summary.md").write_text(markdown(summary))
    print((out / "summary.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
