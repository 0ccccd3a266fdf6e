"""Issue 11, item 7: the default recipe (fp_depth: full weights plus depth adapters) and dense on one GPU,
bf16, at GPU scale.

The arms (`--arms`: named recipes of `loopus.train.recipes`) train on the same packed rows in the same order
(built once and handed to every trainer), with bench/recipes.py's model, split, corpora and seed at GPU
scale: rows of 1024 tokens, bf16 autocast, 10% warm-up. Device time is lent by the minute, so the script
first probes throughput settings side by side on every arm (`--settings`: batch size and cross-entropy
chunk, a few training steps each, with peak GPU memory), picks the one that trains all arms fastest
together, profiles two steps of each arm there (OUT/profile-ARM.txt, and the share of wall time the GPU
spent in kernels), and then trains every arm on the same number of tokens: as many as fit `--train-minutes`
together, at most `--max-tokens` (20M). Each arm is then scored like recipes.py (8,192 held-out tokens per
corpus, loops 1/2/4/8 for looped arms), and OUT/summary.json records the probes, tokens/s and model-FLOPs
utilisation (matmul FLOPs of the step as loopus.train.flops counts them, over the GPU's bf16 peak). The
default arms read whole documents: 20M tokens read thousands of them, and the spread arms' 2 rows per
document would cap a run at the corpora's 16k rows. (The H200 run in docs/RESULTS.md trained bench/recipes.py's
fp_depth arm, the default recipe at lr 2e-5, from before the recipes moved into the package.)

    LOOPUS_DATA=../shared/data python bench/gpu_study.py --out runs/gpu_study --train-minutes 7
        # the GPU run on one H200 (docs/RESULTS.md)
    python bench/gpu_study.py --out runs/gpu_smoke --max-tokens 1024 --seq-len 64 --settings 2:64,4:16 \\
        --probe-steps 2 --train-minutes 0.5 --score-tokens 128                     # CPU check of the script
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from loopus.train import recipes
from loopus.train.flops import peak_flops

MODEL, SPLIT, CORPUS, SEED = "gemma-3-270m", (6, 3), ["enwiki", "eltec_eng"], 0  # as bench/recipes.py


def arm_config(arm: str, out: Path, args: argparse.Namespace, max_tokens: int, setting: tuple[int, int]):
    """The arm's TrainConfig at `setting` = (batch size, cross-entropy chunk) for `max_tokens` tokens."""
    from loopus.train import TrainConfig

    batch_size, ce_chunk = setting
    steps = max(1, max_tokens // (args.seq_len * batch_size))
    return TrainConfig.of(
        recipe=arm, model=MODEL, encoder_layers=SPLIT[0], decoder_layers=SPLIT[1], corpus=CORPUS, seed=SEED,
        out=str(out), data=args.data, seq_len=args.seq_len, batch_size=batch_size, max_steps=steps,
        warmup_steps=max(1, steps // 10), precision=args.precision, ce_chunk=ce_chunk, val_tokens=2048,
        eval_loops=[1, 4], save_every=0, eval_at_start=False, eval_at_end=False, tensorboard=False)


def step_flops(cfg, base_config) -> float:
    """Matmul FLOPs per training token of the arm's step (its split, encoder frozen)."""
    from loopus.train.flops import dense_step_flops, rds_step_flops

    build = cfg.build
    if not build.looped:
        return dense_step_flops(base_config, cfg.dataset.seq_len, frozen_front_layers=build.encoder_layers)
    return rds_step_flops(base_config, cfg.dataset.seq_len, build.encoder_layers, build.decoder_layers, cfg.rds,
                          weights_train="reasoning" not in build.freeze)


def score(arm: str, out: Path, data: str | None, tokens: int, device: str) -> dict:
    """Held-out perplexity of the trained arm at 1/2/4/8 loops (a dense arm recast with the split: 1 loop)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loopus.convert import as_looped
    from loopus.eval.scoring import held_out_scores

    model = AutoModelForCausalLM.from_pretrained(out / arm, dtype=torch.float32)
    loops = [1, 2, 4, 8] if recipes.recipe(arm)["mode"] == "loopus" else [1]
    model = as_looped(model, *SPLIT).to(device).eval()
    return held_out_scores(model, AutoTokenizer.from_pretrained(out / arm), loops, data, tokens)


def parse_settings(text: str) -> list[tuple[int, int]]:
    """"16:256,64:4096" -> [(16, 256), (64, 4096)]: (batch size, cross-entropy chunk) pairs."""
    try:
        pairs = [tuple(int(v) for v in item.split(":")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(pair) != 2 or min(pair) < 1 for pair in pairs):
        raise argparse.ArgumentTypeError(f"--settings {text!r}: expected BATCH:CE_CHUNK pairs, e.g. 16:256,64:4096")
    return pairs


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def short_trainer(arm: str, out: Path, args: argparse.Namespace, setting: tuple[int, int], steps: int,
                  base, tokenizer, data):
    """A trainer of the arm at `setting` whose `train_step` is called directly (no checkpoint or final save)."""
    from loopus.train import Trainer

    tokens = steps * args.seq_len * setting[0]
    return Trainer(arm_config(arm, out / f"probe-{arm}", args, tokens, setting), model=copy.deepcopy(base),
                   tokenizer=tokenizer, data=data)


def free_memory() -> None:
    """Return a dropped trainer's GPU memory, so the next probe starts from the same free memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def median_step_s(trainer, steps: int) -> float:
    """Median wall time of `steps` calls of `trainer.train_step` after the first (which warms the caches)."""
    times = []
    for _ in range(steps):
        synchronize()
        t0 = time.perf_counter()
        trainer.train_step()
        synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:] or times)


def probe(arm: str, out: Path, args: argparse.Namespace, setting: tuple[int, int], base, tokenizer, data) -> dict:
    """Tokens/s of the arm's training step at `setting` (the median over the probe's steps after the first)
    and the GPU memory it peaked at; `None` for tokens/s where the setting ran out of GPU memory."""
    trainer = None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer = short_trainer(arm, out, args, setting, args.probe_steps, base, tokenizer, data)
        rate = args.seq_len * setting[0] / median_step_s(trainer, args.probe_steps)
    except torch.cuda.OutOfMemoryError:
        rate = None
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    trainer = None
    free_memory()
    return {"batch_size": setting[0], "ce_chunk": setting[1], "tokens_per_s": rate, "peak_gib": memory}


def probe_settings(arms: list[str], out: Path, args: argparse.Namespace, base, tokenizer,
                   data) -> tuple[tuple[int, int], list[dict]]:
    """Every (batch size, CE chunk) setting on every arm, side by side; returns the setting that trains
    all arms fastest together (the least sum over arms of 1 / tokens/s) and the probe table. Both are
    throughput knobs only: the arms' recipe is the same at every setting, apart from the batch size."""
    table = []
    for setting in args.settings:
        for arm in arms:
            row = {"arm": arm, **probe(arm, out, args, setting, base, tokenizer, data)}
            table.append(row)
            print(f"probe {arm} batch {setting[0]} ce_chunk {setting[1]}: "
                  + (f"{row['tokens_per_s']:.0f} tok/s" if row["tokens_per_s"] else "out of GPU memory")
                  + (f", peak {row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else ""), flush=True)
            if row["tokens_per_s"] is None:
                break
    cost = {}
    for setting in args.settings:
        rates = [r["tokens_per_s"] for r in table if (r["batch_size"], r["ce_chunk"]) == setting]
        if len(rates) == len(arms) and all(rates):
            cost[setting] = sum(1 / r for r in rates)
    if not cost:
        raise SystemExit(f"every setting in --settings ran out of GPU memory: {table}")
    return min(cost, key=cost.get), table


def profile(arm: str, out: Path, args: argparse.Namespace, setting: tuple[int, int], base, tokenizer, data) -> dict:
    """torch.profiler over 2 training steps (after one warm-up step): the top operators by self time go
    to OUT/profile-ARM.txt, and the share of the steps' wall time the GPU spent in kernels (near 1: the
    step is GPU-bound; well below: the host does not keep the GPU fed) goes to the summary."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile

    trainer = short_trainer(arm, out, args, setting, 3, base, tokenizer, data)
    trainer.train_step()
    synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(2):
            trainer.train_step()
        synchronize()
        wall = time.perf_counter() - t0
    trainer = None
    free_memory()
    averages = prof.key_averages()
    # kernels only (as the profiler's own table totals them): CPU operators report their kernels' time too
    device_us = sum(e.self_device_time_total for e in averages
                    if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    tables = [averages.table(sort_by=key, row_limit=30) for key in
              (["self_device_time_total"] if torch.cuda.is_available() else []) + ["self_cpu_time_total"]]
    (out / f"profile-{arm}.txt").write_text(f"{arm}, batch {setting[0]}, ce_chunk {setting[1]}: 2 steps, "
                                            f"{wall:.3f} s wall\n\n" + "\n\n".join(tables))
    busy = device_us / 1e6 / wall if torch.cuda.is_available() else None
    return {"steps": 2, "wall_s": wall, "gpu_kernel_s": device_us / 1e6, "gpu_busy": busy}


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
    from loopus.train import Trainer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_study")
    p.add_argument("--data", default=None, help="data directory (default $LOOPUS_DATA)")
    p.add_argument("--max-tokens", type=int, default=20_000_000, help="training tokens per arm, at most")
    p.add_argument("--train-minutes", type=float, default=5.0, help="training time of all arms together")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--settings", type=parse_settings, default=parse_settings("16:256,16:4096,32:4096,64:4096"),
                   help="BATCH:CE_CHUNK pairs to probe; the arms train at the fastest (16:256 is the first "
                        "GPU run's; CE_CHUNK = positions per cross-entropy chunk)")
    p.add_argument("--precision", default="auto", help="auto: bf16 autocast on a GPU, fp32 on CPU")
    p.add_argument("--probe-steps", type=int, default=5)
    p.add_argument("--arms", default="dense,default", help="recipes (loopus.train.recipes), comma-separated")
    p.add_argument("--score-tokens", type=int, default=8192, help="held-out tokens per corpus")
    p.add_argument("--plot-from", default=None, metavar="DIR",
                   help="only draw DIR/training.png from a finished run's logs (DIR/ARM/logs/train.jsonl)")
    args = p.parse_args(argv)
    if args.plot_from is not None:
        run = Path(args.plot_from)
        print(plot_training(run, list(json.loads((run / "summary.json").read_text())["arms"]), run / "training.png"))
        return 0
    arms = args.arms.split(",")
    if unknown := sorted(set(arms) - set(recipes.RECIPES)):
        p.error(f"unknown recipes {unknown}; choose from {', '.join(recipes.RECIPES)}")

    from loopus.train.data import build_data
    from loopus.zoo import load_base

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.time()
    base, tokenizer = load_base(MODEL)
    rows = args.max_tokens // args.seq_len
    data = build_data(tokenizer, CORPUS, args.data, args.seq_len, rows, 1, SEED)
    summary: dict = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "torch": torch.__version__, "data_s": time.time() - started, "mix": data.mix, "arms": {}}
    setting, probes = probe_settings(arms, out, args, base, tokenizer, data)
    rates = {r["arm"]: r["tokens_per_s"] for r in probes if (r["batch_size"], r["ce_chunk"]) == setting}
    summary.update(probes=probes, setting={"batch_size": setting[0], "ce_chunk": setting[1]})
    summary["profiles"] = {arm: profile(arm, out, args, setting, base, tokenizer, data) for arm in arms}
    print(f"training at batch {setting[0]}, ce_chunk {setting[1]}; share of wall time in GPU kernels: "
          + ", ".join(f"{arm} {v['gpu_busy']:.2f}" if v["gpu_busy"] is not None else f"{arm} n/a"
                      for arm, v in summary["profiles"].items()), flush=True)
    # equal tokens for every arm: the sum over arms of N / tokens_per_s is the training time
    affordable = args.train_minutes * 60 / sum(1 / r for r in rates.values())
    batch_tokens = args.seq_len * setting[0]
    tokens = max(1, int(min(args.max_tokens, affordable)) // batch_tokens) * batch_tokens
    summary["tokens_per_arm"] = tokens
    peak = peak_flops()
    for arm in arms:
        cfg = arm_config(arm, out / arm, args, tokens, setting)
        trainer = Trainer(cfg, model=copy.deepcopy(base), tokenizer=tokenizer, data=data)
        history = trainer.train()
        flops = step_flops(trainer.cfg, base.config)
        rate = history["throughput"]["tokens_per_s"]
        entry = {"probe_tokens_per_s": rates[arm], "tokens": trainer.tokens, "steps": trainer.step,
                 "train_s": history["throughput"]["seconds"], "tokens_per_s": rate, "flops_per_token": flops,
                 "achieved_tflops": flops * rate / 1e12, "mfu": flops * rate / peak if peak else None}
        trainer = None
        free_memory()
        entry["scores"] = score(arm, out, args.data, args.score_tokens, device)
        summary["arms"][arm] = entry
        summary["wall_s"] = time.time() - started
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"[{arm}] {entry['tokens']} tokens, {rate:.0f} tok/s, MFU "
              + (f"{entry['mfu']:.3f}" if peak else "n/a (no GPU peak known)"), flush=True)
    print(f"training curves: {plot_training(out, arms, out / 'training.png')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
