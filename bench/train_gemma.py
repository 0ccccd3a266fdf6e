"""The real run: RDS post-training of the embedded Gemma 3 270M, and a dense run on the same tokens.

    python bench/train_gemma.py --out runs/gemma_rds --steps 40            # CPU, fp32
    python bench/train_gemma.py --out runs/gemma_rds --max-tokens 20000000 --seq-len 1024 --batch-size 16  # GPU, bf16

Both runs read the same packed rows in the same order (same corpus, seed, sequence length, batch),
so they see exactly the same tokens. Validation loss is measured before and after at loop counts
1, 2, 4, 8 for LoopUS, and at one pass for the dense run (plus, for reference, the dense-trained
weights recast with the same split and evaluated at the same loop counts with an untrained gate).
Results: OUT/summary.json and a Markdown table on stdout / OUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import loopus
from loopus.train import TrainConfig, Trainer
from loopus.train.evaluation import evaluate
from loopus.train.flops import dense_step_flops, peak_flops, rds_step_flops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--data", default=None, help="data dir (default $LOOPUS_DATA)")
    p.add_argument("--corpus", default="enwiki")
    p.add_argument("--out", default="runs/gemma_rds")
    p.add_argument("--encoder-layers", type=int, default=4)
    p.add_argument("--decoder-layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--horizon", default="2,6", help="T range, e.g. 2,6")
    p.add_argument("--supervised", default="2,2", help="|S| range")
    p.add_argument("--val-tokens", type=int, default=2048)
    p.add_argument("--eval-loops", default="1,2,4,8")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--precision", default="auto")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--only-dense", action="store_true")
    p.add_argument("--save-every", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps is None and args.max_tokens is None:
        p.error("give --steps or --max-tokens")
    out = Path(args.out)
    horizon = tuple(int(x) for x in args.horizon.split(","))
    supervised = tuple(int(x) for x in args.supervised.split(","))
    common = dict(
        model=args.model, data=args.data, corpus=[args.corpus], seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_steps=args.steps, max_tokens=args.max_tokens, lr=args.lr,
        warmup_steps=args.warmup_steps, val_tokens=args.val_tokens, threads=args.threads, precision=args.precision,
        encoder_layers=args.encoder_layers, decoder_layers=args.decoder_layers, eval_loops=args.eval_loops,
        gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every, eval_batch_size=2,
        resume=True, depth_lora_rank=0, freeze=["embeddings", "encoder"],  # full-weight RDS, as its figures
    )
    summary: dict = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "threads": torch.get_num_threads() if args.threads == 0 else args.threads}
    peak = peak_flops()
    runs = [] if args.only_dense else ["loopus"]
    runs += [] if args.skip_dense else ["dense"]
    for mode in runs:
        recipe = {"recipe": "dense"} if mode == "dense" else {"horizon_min": horizon[0], "horizon_max": horizon[1],
                                                              "supervised_min": supervised[0],
                                                              "supervised_max": supervised[1]}
        trainer = Trainer(TrainConfig.of(out=str(out / mode), **recipe, **common))
        cfg = trainer.cfg
        started = time.time()
        history = trainer.train()
        result = {"before": history.get("before"), "after": history.get("after"),
                  "throughput": history["throughput"], "steps": trainer.step, "tokens": trainer.tokens,
                  "wall_s": time.time() - started, "mix": trainer.data.mix}
        build, seq_len = cfg.build, cfg.dataset.seq_len
        if mode == "loopus":
            flops = rds_step_flops(trainer.core.config.base_config, seq_len, build.encoder_layers,
                                   build.decoder_layers, cfg.rds, cfg.gradient_checkpointing)
        else:
            flops = dense_step_flops(trainer.core.config, seq_len, build.encoder_layers, cfg.gradient_checkpointing)
        result["flops_per_token"] = flops
        result["achieved_flops"] = flops * history["throughput"]["tokens_per_s"]
        if peak:
            result["mfu"] = result["achieved_flops"] / peak
        if mode == "dense":
            # the dense-trained weights recast with the same split, untrained gate: for reference only
            recast = loopus.convert(trainer.core.eval(), build.encoder_layers, build.decoder_layers)
            batches = trainer.data.valid_batches(cfg.logging.eval_batch_size)
            with trainer.accelerator.autocast():
                result["after_recast"] = evaluate(recast, batches, cfg.logging.eval_loops, cfg.rds,
                                                  trainer.accelerator.device)
        summary[mode] = result
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        del trainer
    lines = ["| run | when | " + " | ".join(f"loss @{n}" for n in args.eval_loops.split(",")) + " |",
             "|---|---|" + "---|" * len(args.eval_loops.split(","))]
    for mode in runs:
        r = summary[mode]
        for when in ("before", "after", "after_recast"):
            if not r.get(when):
                continue
            cells = [f"{r[when][n]['loss']:.4f}" if n in r[when] else "" for n in args.eval_loops.split(",")]
            lines.append(f"| {mode} | {when} | " + " | ".join(cells) + " |")
    for mode in runs:
        r = summary[mode]
        lines.append(f"\n{mode}: {r['steps']} steps, {r['tokens']} tokens, {r['throughput']['tokens_per_s']:.1f} tok/s, "
                     f"{r['wall_s'] / 60:.1f} min, {r['flops_per_token'] / 1e9:.2f} GFLOP/token"
                     + (f", MFU {r['mfu']:.3f}" if 'mfu' in r else ""))
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
