"""Issue 11, item 7: the default recipe (fp_depth: full weights plus depth adapters) and dense on one GPU,
bf16, at GPU scale.

The arms (`--arms`, bench/recipes.py's) train on the same packed rows in the same order (built once
and handed to every trainer), with bench/recipes.py's settings except for the scale: rows of 1024
tokens, batch 16, bf16 autocast, 10% warm-up. Device time is lent by the minute, so a short probe of each arm first measures its
tokens/s, and every arm then trains on the same number of tokens: as many as fit `--train-minutes`
together, at most `--max-tokens` (20M). Each arm is then scored like recipes.py (8,192 held-out tokens
per corpus, loops 1/2/4/8 for looped arms), and OUT/summary.json records tokens/s and model-FLOPs
utilisation (matmul FLOPs of the step as loopus.train.flops counts them, over the GPU's bf16 peak).
The default arms read whole documents: 20M tokens read thousands of them, and the spread arms'
2 rows per document would cap a run at the corpora's 16k rows.

    LOOPUS_DATA=../shared/data python bench/gpu_study.py --out runs/gpu_study --train-minutes 6.5
        # the GPU run: 7.4 min on one H200, 7.55M tokens per arm (docs/RESULTS.md)
    python bench/gpu_study.py --out runs/gpu_smoke --max-tokens 1024 --seq-len 64 --batch-size 2 \\
        --probe-steps 2 --train-minutes 0.5 --score-tokens 128                     # CPU check of the script
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from recipes import ARMS, COMMON, score_arm  # noqa: E402  (bench/ is the script's directory)
from train_gemma import peak_flops  # noqa: E402


def arm_config(arm: str, out: Path, args: argparse.Namespace, max_tokens: int):
    from loopus.train import TrainConfig

    steps = max(1, max_tokens // (args.seq_len * args.batch_size))
    settings = {**COMMON, **ARMS[arm][1], "out": str(out), "data": args.data, "seq_len": args.seq_len,
                "batch_size": args.batch_size, "max_tokens": None, "max_steps": steps,
                "warmup_steps": max(1, steps // 10), "precision": args.precision, "ce_chunk": args.ce_chunk,
                "save_every": 0, "eval_at_start": False, "eval_at_end": False, "progress": True}
    return TrainConfig(**settings)


def step_flops(cfg, base_config) -> float:
    """Matmul FLOPs per training token of the arm's step (recipes' split, encoder frozen)."""
    from loopus.train.flops import dense_step_flops, rds_step_flops

    if cfg.mode == "dense":
        return dense_step_flops(base_config, cfg.seq_len, frozen_front_layers=cfg.encoder_layers)
    return rds_step_flops(base_config, cfg.seq_len, cfg.encoder_layers, cfg.decoder_layers,
                          (cfg.horizon_min, cfg.horizon_max), (cfg.supervised_min, cfg.supervised_max),
                          cfg.grad_steps, supervise_first=cfg.supervise_first,
                          weights_train="reasoning" not in cfg.freeze)


def probe(arm: str, out: Path, args: argparse.Namespace, base, tokenizer, data) -> float:
    """Tokens/s of the arm's training step: the median of the probe's steps after the first."""
    from loopus.train import Trainer

    times: list[float] = []
    shutil.rmtree(out / f"probe-{arm}", ignore_errors=True)
    steps_tokens = args.probe_steps * args.seq_len * args.batch_size
    trainer = Trainer(arm_config(arm, out / f"probe-{arm}", args, steps_tokens), model=copy.deepcopy(base),
                      tokenizer=tokenizer, data=data,
                      callbacks=[lambda _t, _s, metrics: times.append(metrics["step_s"])])
    trainer.train()
    shutil.rmtree(out / f"probe-{arm}")
    seconds = statistics.median(times[1:] or times)
    return args.seq_len * args.batch_size / seconds


def probe_all(arms: list[str], out: Path, args: argparse.Namespace, base, tokenizer, data) -> dict[str, float]:
    """Every arm's tokens/s at one batch size: halved for all arms while an arm runs out of GPU memory,
    so that a device run that is lent by the minute still trains instead of ending in a traceback."""
    while True:
        try:
            return {arm: probe(arm, out, args, base, tokenizer, data) for arm in arms}
        except torch.cuda.OutOfMemoryError:
            if args.batch_size == 1:
                raise
        # outside the except block, so the failed step's tensors are no longer held by its traceback
        args.batch_size //= 2
        gc.collect()
        torch.cuda.empty_cache()
        print(f"out of GPU memory: every arm now trains at batch size {args.batch_size}", flush=True)


def moving_mean(values: list[float], width: int) -> list[float]:
    """Trailing mean over `width` steps: one training batch's loss is too noisy to read a 0.01-nat trend."""
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    return [(sums[i + 1] - sums[max(0, i + 1 - width)]) / (i + 1 - max(0, i + 1 - width)) for i in range(len(values))]


def plot_training(out: Path, arms: list[str], path: Path, width: int = 25) -> Path:
    """Left: each arm's loss at loop 1 against training tokens. Right: for looped arms, the deepest
    supervised loop's loss minus loop 1's on the same batch (below zero: the extra loops help)."""
    from loopus.plotting import pyplot, save_figure

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, arm in enumerate(arms):
        steps = [json.loads(line) for line in (out / arm / "logs" / "train.jsonl").read_text().splitlines()]
        steps = [r for r in steps if "lm" in r]
        tokens = [r["tokens"] / 1e6 for r in steps]
        deepest = [max((int(k[3:]) for k in r if k.startswith("lm@")), default=1) for r in steps]
        looped = max(deepest) > 1
        # unlooped arms dashed and on top, so an arm that tracks dense exactly stays visible under it
        style = {"color": f"C{i}", "linestyle": "-" if looped else "--", "zorder": 2 if looped else 3}
        left.plot(tokens, moving_mean([r.get("lm@1", r["lm"]) for r in steps], width), label=arm, **style)
        if looped:
            gap = [r[f"lm@{t}"] - r["lm@1"] for r, t in zip(steps, deepest)]
            right.plot(tokens, moving_mean(gap, width), label=arm, **style)
    left.set(xlabel="training tokens (M)", ylabel=f"training loss at loop 1 (nats, mean of {width} steps)",
             title="loss at one loop")
    right.axhline(0.0, color="gray", linewidth=0.8)
    right.set(xlabel="training tokens (M)", ylabel="loss at the deepest supervised loop - loop 1 (nats)",
              title="what the extra loops add (below 0: they help)")
    left.legend()
    if right.get_legend_handles_labels()[0]:
        right.legend()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from loopus.train import TrainConfig, Trainer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_study")
    p.add_argument("--data", default=None, help="data directory (default $LOOPUS_DATA)")
    p.add_argument("--max-tokens", type=int, default=20_000_000, help="training tokens per arm, at most")
    p.add_argument("--train-minutes", type=float, default=5.0, help="training time of all arms together")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="auto", help="auto: bf16 autocast on a GPU, fp32 on CPU")
    p.add_argument("--ce-chunk", type=int, default=TrainConfig.ce_chunk,
                   help="positions per cross-entropy chunk (the default caps memory on a CPU; a GPU holds far more)")
    p.add_argument("--probe-steps", type=int, default=6)
    p.add_argument("--arms", default="dense,fp_depth", help="bench/recipes.py arms, comma-separated")
    p.add_argument("--score-tokens", type=int, default=8192, help="held-out tokens per corpus")
    p.add_argument("--plot-from", default=None, metavar="DIR",
                   help="only draw DIR/training.png from a finished run's logs (DIR/ARM/logs/train.jsonl)")
    args = p.parse_args(argv)
    if args.plot_from is not None:
        run = Path(args.plot_from)
        print(plot_training(run, list(json.loads((run / "summary.json").read_text())["arms"]), run / "training.png"))
        return 0
    arms = args.arms.split(",")
    one_stage = [a for a in ARMS if a != "base" and "init_from" not in ARMS[a][1]]
    if unknown := sorted(set(arms) - set(one_stage)):
        p.error(f"cannot train arms {unknown} here (base and the two-stage arms); choose from {', '.join(one_stage)}")
    # one set of rows for every arm: arms that read different rows (rows_per_doc) cannot share it
    rows_per_doc = {ARMS[a][1].get("rows_per_doc") for a in arms}
    if len(rows_per_doc) > 1:
        p.error(f"arms {arms} read different rows (rows_per_doc {sorted(rows_per_doc, key=str)}): run them separately")

    from loopus.train.data import build_data
    from loopus.zoo import load_base

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.time()
    base, tokenizer = load_base(COMMON["model"])
    rows = args.max_tokens // args.seq_len
    data = build_data(tokenizer, COMMON["corpus"], args.data, args.seq_len, rows, 1, COMMON["seed"],
                      rows_per_doc=rows_per_doc.pop())
    summary: dict = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "torch": torch.__version__, "data_s": time.time() - started, "mix": data.mix, "arms": {}}
    rates = probe_all(arms, out, args, base, tokenizer, data)
    # equal tokens for every arm: the sum over arms of N / tokens_per_s is the training time
    affordable = args.train_minutes * 60 / sum(1 / r for r in rates.values())
    batch_tokens = args.seq_len * args.batch_size
    tokens = max(1, int(min(args.max_tokens, affordable)) // batch_tokens) * batch_tokens
    summary["tokens_per_arm"] = tokens
    peak = peak_flops()
    for arm in arms:
        cfg = arm_config(arm, out / arm, args, tokens)
        trainer = Trainer(cfg, model=copy.deepcopy(base), tokenizer=tokenizer, data=data)
        history = trainer.train()
        flops = step_flops(trainer.cfg, base.config)
        rate = history["throughput"]["tokens_per_s"]
        entry = {"probe_tokens_per_s": rates[arm], "tokens": trainer.tokens, "steps": trainer.step,
                 "train_s": history["throughput"]["seconds"], "tokens_per_s": rate, "flops_per_token": flops,
                 "achieved_tflops": flops * rate / 1e12, "mfu": flops * rate / peak if peak else None}
        del trainer
        entry["scores"] = score_arm(arm, out, args.data, args.score_tokens, device)
        summary["arms"][arm] = entry
        summary["wall_s"] = time.time() - started
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"[{arm}] {entry['tokens']} tokens, {rate:.0f} tok/s, MFU "
              + (f"{entry['mfu']:.3f}" if peak else "n/a (no GPU peak known)"), flush=True)
    print(f"training curves: {plot_training(out, arms, out / 'training.png')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
