"""FSDP on the real Gemma 3 270M: per-process bytes of weights, gradients and AdamW state, sharded vs replicated.

Runs `loopus.train.Trainer` twice under `accelerate launch` on P CPU processes (gloo), once replicated
and once with `fsdp=True`, on the same enwiki tokens and plan, and reports per process after each
optimiser step: the bytes of the parameters, gradients and optimiser state it holds, its peak RSS, and
the losses (which must agree between the two ways).

    LOOPUS_DATA=../shared/data python bench/train_fsdp.py --processes 2 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def worker(args: argparse.Namespace) -> None:
    from loopus.train import TrainConfig, Trainer

    cfg = TrainConfig.of(model="gemma-3-270m", out=args.out, data=args.data, encoder_layers=6, decoder_layers=3,
                         max_steps=args.steps, seq_len=args.seq_len, batch_size=1, horizon_min=2, horizon_max=4,
                         eval_at_start=False, eval_at_end=False, progress=False, tensorboard=False, threads=1,
                         fsdp=args.fsdp, val_tokens=args.seq_len, depth_lora_rank=0)  # FSDP trains full weights
    records = []

    def measure(trainer, step, metrics):
        params = [p for p in trainer.module.parameters()]
        state = [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        record = {"step": step, "rank": trainer.rank, "param_bytes": local_bytes(params),
                  "grad_bytes": local_bytes(p.grad for p in params), "optimizer_bytes": local_bytes(state),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "lm": metrics["lm"], "grad_norm": metrics["grad_norm"], "step_s": metrics["step_s"]}
        gathered = [None] * trainer.world
        torch.distributed.all_gather_object(gathered, record)
        records.extend(gathered)

    trainer = Trainer(cfg, callbacks=[measure])
    trainer.train()
    if trainer.is_main:
        Path(args.result).write_text(json.dumps(records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default="runs/bench_train_fsdp")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", type=lambda s: s == "true", default=False, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    summary = {}
    for mode in ("replicated", "fsdp"):
        result = out / f"{mode}.json"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(args.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   __file__, "--worker", "--fsdp", str(mode == "fsdp").lower(), "--steps", str(args.steps),
                   "--seq-len", str(args.seq_len), "--out", str(out / mode), "--result", str(result)]
        if args.data:
            command += ["--data", args.data]
        subprocess.run(command, env=env, check=True)
        records = json.loads(result.read_text())
        last = [r for r in records if r["step"] == args.steps]
        summary[mode] = {
            "per_process_gib": {k: max(r[k] for r in last) / 2**30
                                for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "peak_rss_bytes")},
            "lm": [r["lm"] for r in records if r["rank"] == 0],
            "grad_norm": [r["grad_norm"] for r in records if r["rank"] == 0],
            "step_s": [r["step_s"] for r in records if r["rank"] == 0],
        }
    rep, sh = summary["replicated"]["per_process_gib"], summary["fsdp"]["per_process_gib"]
    summary["fsdp_over_replicated"] = {k: sh[k] / rep[k] for k in rep if rep[k] > 0}
    summary["processes"] = args.processes
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
