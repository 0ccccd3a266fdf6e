"""Issue 11: the controlled post-training recipe study on the real Gemma 3 270M.

Every arm trains on the same packed rows in the same order (same corpora, seed, sequence length,
batch), with the same optimiser, learning-rate schedule and trainable layers (embeddings and the
6 encoder layers frozen), except where an arm is defined by changing one of them. Arms are scored
on the same held-out tokens: per-loop perplexity with a standard error across 512-token windows,
and the paired standard error of each arm's difference from the dense arm (same windows).

    python bench/recipes.py train dense          # one arm (resumes from its last checkpoint)
    python bench/recipes.py score dense          # held-out perplexity at 1/2/4/8 loops
    python bench/recipes.py lm-eval dense        # arc_easy, piqa, lambada_openai at 1 loop and the best
    python bench/recipes.py all                  # every stage of every arm not done yet, one at a time
    python bench/recipes.py report               # table (markdown) + perplexity-vs-loops PNG

Outputs live under --out (default runs/recipes/ARM/). Training is resumable across sessions
(`--resume` semantics of `loopus train`: the run continues bit-exactly from its last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from loopus.train import recipes

# what every arm shares besides its recipe: model, split, data, run length, bookkeeping
COMMON: dict[str, Any] = {
    "model": "gemma-3-270m",
    "encoder_layers": 6,
    "decoder_layers": 3,
    "corpus": ["enwiki", "eltec_eng"],
    "seq_len": 128,
    "batch_size": 4,
    "max_tokens": 102_400,            # 200 optimiser steps of 4 x 128 label tokens
    "warmup_steps": 20,
    "seed": 0,
    "val_tokens": 2048,
    "eval_loops": [1, 4],
    "save_every": 25,
    "keep_checkpoints": 1,
    "tensorboard": False,
}
# the study's starting point: every recipe setting spelled out (the package's default recipe at the study's
# first lr, full weights without depth adapters), so a later change of the package defaults moves no arm
BASELINE: dict[str, Any] = {**recipes.DEFAULT, "lr": 2e-5, "depth_lora_rank": 0}

FP: dict[str, Any] = {k: recipes.DEFAULT[k]
                      for k in ("mode", "gate_init", "horizon_max", "supervise_first", "new_module_lr_mult")}
DEPTH_ADAPTERS: dict[str, Any] = {k: recipes.DEFAULT[k] for k in ("depth_lora_rank", "adapter_lr_mult")}
DEPTH_ONLY: dict[str, Any] = {**FP, **DEPTH_ADAPTERS, "freeze": recipes.FROZEN_BASE["freeze"]}
PAPER: dict[str, Any] = {k: recipes.PAPER[k]
                         for k in ("mode", "gate_init", "horizon_max", "supervise_first", "new_module_lr_mult")}

# arm -> (what it is, TrainConfig overrides); "base" is the untrained model
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "base": ("Gemma 3 270M, untrained", {}),
    "dense": ("plain continued training of the unlooped model, same trainable layers", {"mode": "dense"}),
    "paper": ("LoopUS, the paper recipe: gate init 0.5, T ~ U{2..8}, |S| = 2", PAPER),
    "fp": ("LoopUS, function-preserving: gate init 0.02, T ~ U{2..4}, loop 1 always supervised, "
           "gate and confidence head at 1000x lr", FP),
    "fp_kl": ("fp + KL(base || loop 1) with weight 1 (the frozen model before training as the reference)",
              {**FP, "kl_base": 1.0}),
    "fp_depth": ("fp + depth-wise LoRA (rank 16, 10x lr) on the reasoning block from loop 2 on; "
                 "the shared weights train too", {**FP, **DEPTH_ADAPTERS}),
    "depth_only": ("depth-wise LoRA only (rank 16, 10x lr), gate and confidence head; every base weight "
                   "frozen, so one loop stays exactly the base model", DEPTH_ONLY),
    "depth_only_t2": ("depth_only with T = 2 (loops 1 and 2 supervised in every batch): do the deeper "
                      "horizons cause depth_only's loss beyond 2 loops?", {**DEPTH_ONLY, "horizon_max": 2}),
    # the arms above read whole documents from the start of each file: 100k tokens are 16 documents
    "dense_spread": ("dense on rows spread over documents (at most 2 rows per document, evenly spaced: "
                     "400 documents)", {"mode": "dense", "rows_per_doc": 2}),
    "depth_only_spread": ("depth_only on the same spread rows as dense_spread: does the deep-loop loss "
                          "come from fitting 16 documents?", {**DEPTH_ONLY, "rows_per_doc": 2}),
    "fp_depth_spread": ("fp_depth on the spread rows: the shared weights take dense's gain, do the depth "
                        "adapters add loop gains on top?", {**FP, **DEPTH_ADAPTERS, "rows_per_doc": 2}),
    "fp_spread": ("fp on the spread rows: does the default need its depth adapters?", {**FP, "rows_per_doc": 2}),
    # the dense lr sweep on the spread rows (dense_spread is its 2e-5 point)
    "dense_spread_lr6e-5": ("dense_spread at 3x the lr (6e-5): does the dense baseline gain more at a higher lr?",
                            {"mode": "dense", "rows_per_doc": 2, "lr": 6e-5}),
    "dense_spread_lr7e-6": ("dense_spread at a third of the lr (7e-6): the package's dense recipe",
                            {**recipes.DENSE, "rows_per_doc": 2}),
    "dense_spread_lr2e-6": ("dense_spread at a tenth of the lr (2e-6)", {"mode": "dense", "rows_per_doc": 2, "lr": 2e-6}),
    "fp_depth_spread_lr7e-6": ("fp_depth_spread at dense's best lr (7e-6; the gate, head and adapter multipliers "
                               "unchanged): the package's default recipe", {**recipes.DEFAULT, "rows_per_doc": 2}),
    "fp_depth_kl_spread_lr7e-6": ("fp_depth_spread_lr7e-6 + KL(base || loop 1), weight 1: with loop 1 held near "
                                  "the base, do the depth adapters take the gain in the extra loops?",
                                  {**FP, **DEPTH_ADAPTERS, "rows_per_doc": 2, "lr": 7e-6, "kl_base": 1.0}),
    "depth_only_bptt_spread": ("depth_only_spread with the gradient through every loop step from 2 to T "
                               "(grad_steps 4; the default trains step T alone, on a detached state): do loops "
                               "learn to build on each other, so that 4 beats 2?",
                               {**DEPTH_ONLY, "rows_per_doc": 2, "grad_steps": 4}),
    "depth_only_perloop_spread": ("depth_only_bptt_spread with an adapter of its own for each of loops 2, 3 and 4 "
                                  "(depth_lora_count 3; later loops reuse loop 4's): is the shared adapter's "
                                  "repeated step what makes 4 loops worse than 2?",
                                  {**DEPTH_ONLY, "rows_per_doc": 2, "grad_steps": 4, "depth_lora_count": 3}),
    "fp_depth_perloop_spread_lr7e-6": ("the default recipe (fp_depth_spread_lr7e-6) with an adapter of its own for "
                                       "each of loops 2, 3 and 4: do per-loop adapters make the default's loops pay?",
                                       {**FP, **DEPTH_ADAPTERS, "rows_per_doc": 2, "lr": 7e-6, "depth_lora_count": 3}),
    # a two-stage arm: a second pass over the same spread rows, starting from dense_spread's weights
    "depth_on_dense": ("depth_only on top of dense_spread's weights, the same rows again: one loop stays "
                       "exactly dense_spread; do the adapters add loop gains to a trained base?",
                       {**DEPTH_ONLY, "rows_per_doc": 2, "init_from": "dense_spread"}),
}

# the study's winner: the package's default recipe (loopus.train.recipes.DEFAULT) is its recipe, and
# tests/test_default_recipe.py holds the two equal
DEFAULT_ARM = "fp_depth_spread_lr7e-6"

TASKS = ["arc_easy", "piqa", "lambada_openai"]


def arm_dir(out: Path, arm: str) -> Path:
    return out / arm


def trained(out: Path, arm: str) -> bool:
    return arm == "base" or (arm_dir(out, arm) / "metrics.json").is_file()


def train_arm(arm: str, out: Path, data: str | None, max_tokens: int | None) -> None:
    from loopus.train import TrainConfig, Trainer
    from loopus.train.checkpointing import latest_checkpoint

    if arm == "base" or trained(out, arm):
        print(f"[{arm}] trained already" if arm != "base" else "[base] nothing to train")
        return
    overrides = dict(ARMS[arm][1])
    parent = overrides.pop("init_from", None)
    settings = {**COMMON, **BASELINE, **overrides, "out": str(arm_dir(out, arm)), "data": data}
    if parent is not None:
        if not trained(out, parent):
            raise SystemExit(f"[{arm}] starts from arm {parent!r}, which is not trained under {out}: "
                             f"run `python bench/recipes.py train {parent}` first")
        settings["model"] = str(arm_dir(out, parent))
    if max_tokens is not None:
        settings["max_tokens"] = max_tokens
    settings["resume"] = latest_checkpoint(settings["out"]) is not None
    trainer = Trainer(TrainConfig.of(**settings))
    start = time.time()
    result = trainer.train()
    (arm_dir(out, arm) / "recipe.json").write_text(json.dumps(
        {"arm": arm, "description": ARMS[arm][0], "config": trainer.cfg.to_dict(),
         "wall_s_this_session": time.time() - start,
         "throughput": {k: v for k, v in result.items() if "tokens" in k or "time" in k}}, indent=1, default=str))


def load_scorable(arm: str, out: Path, device: str = "cpu"):
    """The arm's model as a LoopUS model (base and dense are recast with the study's split: at one loop
    that computes exactly the unlooped model) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loopus.convert import as_looped
    from loopus.zoo import load_base

    if arm == "base":
        model, tokenizer = load_base(COMMON["model"])
    else:
        path = arm_dir(out, arm)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return as_looped(model, COMMON["encoder_layers"], COMMON["decoder_layers"]).to(device).eval(), tokenizer


def looped_arm(arm: str) -> bool:
    return ARMS[arm][1].get("mode") == "loopus"


def score_arm(arm: str, out: Path, data: str | None, tokens: int, device: str = "cpu") -> dict[str, Any]:
    from loopus.eval.scoring import held_out_scores

    model, tokenizer = load_scorable(arm, out, device)
    loops = [1, 2, 4, 8] if looped_arm(arm) else [1]
    result: dict[str, Any] = {"arm": arm, "tokens_per_corpus": tokens, "window": 512, "loops": loops}
    start = time.time()
    result.update(held_out_scores(model, tokenizer, loops, data, tokens))
    for name, scores in result.items():
        if isinstance(scores, dict):
            print(f"[{arm}] {name}: " + ", ".join(f"{n} loops {v['ppl']:.3f} ± {v['ppl'] * v['nll_se']:.3f}"
                                                   for n, v in scores.items()), flush=True)
    result["wall_s"] = time.time() - start
    path = arm_dir(out, arm)
    path.mkdir(parents=True, exist_ok=True)
    (path / "scores.json").write_text(json.dumps(result))
    return result


def best_loops(scores: dict[str, Any]) -> int:
    """The loop count with the lowest mean NLL over enwiki and ELTeC (the training corpora's held-out text)."""
    loops = scores["loops"]
    return min(loops, key=lambda n: scores["enwiki"][str(n)]["nll"] + scores["eltec_eng"][str(n)]["nll"])


def lm_eval_arm(arm: str, out: Path, limit: int) -> dict[str, Any]:
    from loopus.eval.harness import evaluate_hf, evaluate_loopus
    from loopus.zoo import resolve

    path = arm_dir(out, arm)
    result: dict[str, Any] = {"arm": arm, "limit": limit, "tasks": TASKS}
    start = time.time()
    if looped_arm(arm):
        scores = json.loads((path / "scores.json").read_text())
        loops = sorted({1, best_loops(scores)})
        result["loops"] = {str(n): m for n, m in evaluate_loopus(str(path), TASKS, loops=loops, limit=limit)["loops"].items()}
    else:
        model = resolve(COMMON["model"]) if arm == "base" else str(path)
        result["loops"] = {"1": evaluate_hf(str(model), TASKS, limit=limit)}
    result["wall_s"] = time.time() - start
    path.mkdir(parents=True, exist_ok=True)
    (path / "lm_eval.json").write_text(json.dumps(result, indent=1))
    print(f"[{arm}] lm-eval: {json.dumps(result['loops'])}", flush=True)
    return result


def paired_difference(arm_windows: list, ref_windows: list) -> tuple[float, float]:
    """Relative perplexity change vs the reference (exp of the NLL difference - 1) and its standard error."""
    from loopus.eval.perplexity import mean_and_se

    sums = [a[0] - b[0] for a, b in zip(arm_windows, ref_windows)]
    counts = [a[1] for a in arm_windows]
    diff, se = mean_and_se(sums, counts)
    return math.expm1(diff), math.exp(diff) * se


def dense_reference(arm: str) -> str:
    """The dense arm trained on the same rows at the same lr as `arm` (dense_spread for the spread arms at
    the study's lr, dense_spread_lr7e-6 for those at 7e-6)."""
    rows, lr = ARMS[arm][1].get("rows_per_doc"), ARMS[arm][1].get("lr", BASELINE["lr"])
    return next(name for name, (_, o) in ARMS.items()
                if o.get("mode") == "dense" and o.get("rows_per_doc") == rows and o.get("lr", BASELINE["lr"]) == lr)


def report(out: Path, plot: Path | None) -> str:
    from loopus.eval.perplexity import HELD_OUT

    rows, curves = [], {}
    scores = {arm: json.loads((arm_dir(out, arm) / "scores.json").read_text())
              for arm in ARMS if (arm_dir(out, arm) / "scores.json").is_file()}
    lines = ["| arm | loops | " + " | ".join(f"{c} ppl ± se" for c in HELD_OUT)
             + " | Δ vs dense on the same rows at the same lr, paired se (" + ", ".join(HELD_OUT) + ") |",
             "|---|---|" + "---|" * len(HELD_OUT) + "---|"]
    for arm, s in scores.items():
        for n in s["loops"]:
            cells = []
            for corpus in HELD_OUT:
                v = s[corpus][str(n)]
                cells.append(f"{v['ppl']:.3f} ± {v['ppl'] * v['nll_se']:.3f}")
                curves.setdefault((arm, corpus), []).append((n, v["ppl"]))
            delta = ""
            ref = scores.get(dense_reference(arm)) if arm != "base" else scores.get("dense")
            if ref is not None and ref is not s:
                parts = []
                for corpus in HELD_OUT:
                    d, se = paired_difference(s[corpus][str(n)]["windows"], ref[corpus]["1"]["windows"])
                    parts.append(f"{100 * d:+.2f}% ± {100 * se:.2f}")
                delta = ", ".join(parts)
            lines.append(f"| {arm} | {n} | " + " | ".join(cells) + f" | {delta} |")
    tokens = {corpus: next(iter(s[corpus].values()))["tokens"] for s in scores.values() for corpus in HELD_OUT}
    lines.append("")
    lines.append("Held-out tokens per corpus: " + ", ".join(f"{c} {t}" for c, t in tokens.items()) + ".")
    evals = {arm: json.loads((arm_dir(out, arm) / "lm_eval.json").read_text())
             for arm in ARMS if (arm_dir(out, arm) / "lm_eval.json").is_file()}
    if evals:
        lines += ["", "| arm | loops | " + " | ".join(TASKS) + " |", "|---|---|" + "---|" * len(TASKS)]
        for arm, e in evals.items():
            for n, metrics in e["loops"].items():
                cells = []
                for task in TASKS:
                    m = metrics.get(task, {})
                    if task == "lambada_openai":
                        cells.append(f"ppl {m.get('perplexity', float('nan')):.2f}, acc {m.get('acc', float('nan')):.3f}")
                    else:
                        acc = m.get("acc", float("nan"))  # binomial standard error over the scored documents
                        cells.append(f"acc {acc:.3f} ± {math.sqrt(acc * (1 - acc) / e['limit']):.3f}")
                lines.append(f"| {arm} | {n} | " + " | ".join(cells) + " |")
        lines.append(f"\nlm-eval limit: {next(iter(evals.values()))['limit']} documents per task.")
    text = "\n".join(lines)
    if plot is not None and scores:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, grid = plt.subplots(2, len(HELD_OUT), figsize=(5 * len(HELD_OUT) + 2.5, 8))
        for ax, corpus in zip(grid[0], HELD_OUT):
            draw_curves(ax, {arm: curves[(arm, corpus)] for arm in scores})
            ax.set_yscale("log")  # one arm can be 10x off: ratios read the same at every height
            ax.set_ylabel("held-out perplexity")
            ax.set_title(corpus)
        for ax, corpus in zip(grid[1], HELD_OUT):
            # the same curves as % change against the untrained base: the 1-2% effects the top row hides
            if ("base", corpus) not in curves:
                continue
            base = curves[("base", corpus)][0][1]
            draw_curves(ax, {arm: [(n, 100 * (p / base - 1)) for n, p in curves[(arm, corpus)]] for arm in scores})
            ax.set_ylim(-7, 8)
            ax.set_ylabel("perplexity vs the base (%), clipped to [-7, 8]")
            ax.set_title(f"{corpus}, relative to the base")
        fig.legend(*grid[0][0].get_legend_handles_labels(), loc="center right", fontsize=8)
        fig.suptitle("Gemma 3 270M, equal training tokens: perplexity vs loop count")
        fig.tight_layout(rect=(0, 0, 0.86, 1))  # the right margin holds the legend
        plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=110)
    return text


UNLOOPED_COLORS = ["black", "dimgray", "darkgoldenrod", "darkslateblue", "darkred", "darkgreen", "darkorange"]
TAB10 = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")]
LOOPED_COLORS = TAB10 + ["navy", "sandybrown", "lime", "salmon", "plum", "peru", "hotpink", "silver", "gold", "teal"]


def draw_curves(ax, curves: dict[str, list[tuple[int, float]]]) -> None:
    """One line per looped arm against loop count; an unlooped arm is a level line. Arms on spread rows
    (`rows_per_doc`) are drawn dotted (unlooped) or dashed with square markers (looped), beside their
    whole-document twins."""
    unlooped = [arm for arm, (_, o) in ARMS.items() if o.get("mode") != "loopus"]
    looped = [arm for arm in ARMS if arm not in unlooped]
    for arm, points in curves.items():
        spread = ARMS[arm][1].get("rows_per_doc") is not None
        if len(points) == 1:  # level lines in dark colours of their own, told apart from the marked loop curves
            ax.axhline(points[0][1], linestyle=":" if spread else "--", label=f"{arm} (unlooped)",
                       color=UNLOOPED_COLORS[unlooped.index(arm) % len(UNLOOPED_COLORS)])
        else:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="s" if spread else "o", label=arm,
                    linestyle="--" if spread else "-", color=LOOPED_COLORS[looped.index(arm) % len(LOOPED_COLORS)])
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8], labels=["1", "2", "4", "8"])
    ax.set_xlabel("loops")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["train", "score", "lm-eval", "all", "report"])
    p.add_argument("arms", nargs="*", help=f"arms (default: all of {', '.join(ARMS)})")
    p.add_argument("--out", default="runs/recipes")
    p.add_argument("--data", default=None, help="data directory (default $LOOPUS_DATA)")
    p.add_argument("--max-tokens", type=int, default=None, help=f"training tokens per arm (default {COMMON['max_tokens']})")
    p.add_argument("--score-tokens", type=int, default=8192, help="held-out tokens per corpus")
    p.add_argument("--limit", type=int, default=200, help="lm-eval documents per task")
    p.add_argument("--plot", default="docs/results/recipes.png")
    args = p.parse_args(argv)
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    arms = args.arms or list(ARMS)
    out = Path(args.out)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    # perplexity first for every arm (the study's main figures), the slower lm-eval pass after
    for arm in arms:
        if args.stage in ("train", "all"):
            train_arm(arm, out, args.data, args.max_tokens)
        if args.stage == "score" or (args.stage == "all" and not (arm_dir(out, arm) / "scores.json").is_file()):
            score_arm(arm, out, args.data, args.score_tokens)
    for arm in arms:
        if args.stage == "lm-eval" or (args.stage == "all" and not (arm_dir(out, arm) / "lm_eval.json").is_file()):
            lm_eval_arm(arm, out, args.limit)
    if args.stage in ("report", "all"):
        print(report(out, Path(args.plot) if args.plot else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
