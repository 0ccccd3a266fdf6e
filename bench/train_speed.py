"""Step time of LoopUS (random deep supervision) over a dense fine-tune step on the same tokens,
next to the ratio of their model FLOPs.

    python bench/train_speed.py                    # the embedded Gemma 3 270M, split 4/2
    python bench/train_speed.py --synthetic        # a small random Gemma-3-shaped model (fast)

Both steps train the same weights (embeddings and the first `encoder` layers frozen, the tied head
frozen with the embeddings) on the same batch. LoopUS steps use plans drawn as in training
(T ~ U{horizon}, |S| ~ U{supervised}); the dense and LoopUS steps are interleaved so load on a
shared machine hits both alike, and the reported figure is the ratio of the summed step times.
The FLOP ratio uses `loopus.train.flops` with exactly the plans that were timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import loopus
from loopus.eval.report import write_json
from loopus.train.flops import dense_step_flops, plan_flops
from loopus.train.objective import RDSConfig, dense_step, rds_step, sample_plan
from loopus.train.params import apply_freeze


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--horizon", default="2,6")
    p.add_argument("--supervised", default="2,2")
    p.add_argument("--encoder", type=int, default=4)
    p.add_argument("--decoder", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.synthetic:
        from transformers import AutoModelForCausalLM, Gemma3TextConfig

        cfg = Gemma3TextConfig(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=128,
                               tie_word_embeddings=True)
        make = lambda: AutoModelForCausalLM.from_config(cfg)  # noqa: E731
    else:
        from loopus.zoo import load_base

        make = lambda: load_base("gemma-3-270m")[0]  # noqa: E731
    dense = make().train().to(device)
    apply_freeze(dense, {"embeddings", "encoder"}, args.encoder, 0)
    looped = loopus.convert(make(), args.encoder, args.decoder).train().to(device)
    apply_freeze(looped, {"embeddings", "encoder"})
    config = dense.config
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), device=device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    horizon = tuple(int(x) for x in args.horizon.split(","))
    supervised = tuple(int(x) for x in args.supervised.split(","))
    generator = torch.Generator().manual_seed(0)
    plans = [sample_plan(generator, RDSConfig(*horizon, *supervised)) for _ in range(args.pairs)]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    # warm-up
    dense_step(dense, inputs, labels)
    rds_step(looped, inputs, labels, plans[0])
    dense_times, loop_times = [], []
    for plan in plans:
        for model in (dense, looped):
            model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        dense_step(dense, inputs, labels)
        sync()
        t1 = time.perf_counter()
        rds_step(looped, inputs, labels, plan)
        sync()
        t2 = time.perf_counter()
        dense_times.append(t1 - t0)
        loop_times.append(t2 - t1)
    dense_flops = dense_step_flops(config, args.seq, args.encoder)
    loop_flops = sum(plan_flops(config, args.seq, args.encoder, args.decoder, plan) for plan in plans) / len(plans)
    tokens = args.batch * args.seq
    result = {
        "model": "synthetic" if args.synthetic else "gemma-3-270m",
        "device": device, "threads": args.threads, "tokens_per_step": tokens,
        "plans": [[p.horizon, list(p.supervised)] for p in plans],
        "dense_s": dense_times, "loopus_s": loop_times,
        "time_ratio": sum(loop_times) / sum(dense_times),
        "flop_ratio": loop_flops / dense_flops,
        "dense_gflop_per_token": dense_flops / 1e9, "loopus_gflop_per_token": loop_flops / 1e9,
        "dense_tokens_per_s": tokens * len(plans) / sum(dense_times),
        "loopus_tokens_per_s": tokens * len(plans) / sum(loop_times),
    }
    if args.out:
        write_json(result, args.out)
    print(json.dumps(result, indent=1))
    print(f"LoopUS/dense step time {result['time_ratio']:.2f}x, FLOP ratio {result['flop_ratio']:.2f}x "
          f"(dense {result['dense_tokens_per_s']:.1f} tok/s, LoopUS {result['loopus_tokens_per_s']:.1f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
