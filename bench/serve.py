"""Load benchmark of `loopus serve` on the embedded Gemma 3 270M, against its unlooped base served the same way.

One run, on one machine, side by side: the looped model (converted on the fly, split E/D) at a fixed
1 loop, a fixed B loops and adaptive exit (budget B, an exit strategy), and the base model behind the
same server code. For each, concurrency 1, 4 and 16: that many clients (threads with the official
`openai` client) send streamed greedy completions of short prompts to the server on 127.0.0.1 until
the phase's requests are done. Reported per cell: p50 and p99 latency (request sent to last chunk),
p50 time to first token, tokens/s over the phase's wall time, mean loop passes per generated token
(from `usage`), and latency and throughput as a ratio to the base at the same concurrency.

The server runs one generation at a time (not batched), so latency grows with concurrency while
throughput stays near the single-stream rate. With 16 samples or fewer, p99 is the slowest request.

    python bench/serve.py --out runs/bench_serve.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch

import loopus
from loopus.serving.app import build_app, serving
from loopus.serving.engine import Engine
from loopus.zoo import load_base

PROMPTS = [
    "The capital of France is",
    "In 1969 the first people to walk on the Moon",
    "A recipe for bread needs flour, water and",
    "The largest animal that has ever lived is",
    "Photosynthesis is the process by which plants",
    "The river Thames flows through",
    "Mozart was born in the city of",
    "A prime number is a number that",
]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def one_request(client: openai.OpenAI, model: str, prompt: str, max_tokens: int, loop: dict) -> dict:
    sent = time.perf_counter()
    first, usage = None, None
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}, extra_body=loop):
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    done = time.perf_counter()
    return {"latency": done - sent, "ttft": (first or done) - sent, "tokens": usage.completion_tokens,
            "mean_passes": getattr(usage, "mean_loop_passes", None)}


def phase(url: str, model: str, concurrency: int, requests: int, max_tokens: int, loop: dict) -> dict:
    """`requests` requests from `concurrency` clients at once; latency percentiles and throughput."""
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_request(client, model, p, max_tokens, loop), prompts))
    wall = time.perf_counter() - start
    latencies = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    passes = [r["mean_passes"] * r["tokens"] for r in results if r["mean_passes"] is not None]
    return {
        "concurrency": concurrency, "requests": requests, "tokens": tokens, "wall_s": wall,
        "p50_latency_s": percentile(latencies, 50), "p99_latency_s": percentile(latencies, 99),
        "p50_ttft_s": percentile([r["ttft"] for r in results], 50), "tokens_per_s": tokens / wall,
        "mean_passes": sum(passes) / tokens if passes else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--encoder-layers", type=int, default=6)
    p.add_argument("--decoder-layers", type=int, default=3)
    p.add_argument("--budget", type=int, default=4, help="the fixed budget and the adaptive arm's budget")
    p.add_argument("--exit-strategy", default="convergence")
    p.add_argument("--exit-threshold", type=float, default=0.05)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=8, help="requests per phase (at least the concurrency)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="runs/bench_serve.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]

    base, tokenizer = load_base(args.model)
    looped_base, _ = load_base(args.model)  # a second copy: the converted model drives its layers
    looped = loopus.convert(looped_base, args.encoder_layers, args.decoder_layers, num_loops=args.budget).eval()
    engines = {"base": Engine(base, tokenizer, "base"), "looped": Engine(looped, tokenizer, "looped")}
    arms = [
        ("base (unlooped)", "base", {}),
        ("1 loop", "looped", {"num_loops": 1}),
        (f"{args.budget} loops", "looped", {"num_loops": args.budget}),
        (f"adaptive ({args.exit_strategy} {args.exit_threshold:g}, budget {args.budget})", "looped",
         {"num_loops": args.budget, "exit_strategy": args.exit_strategy, "exit_threshold": args.exit_threshold}),
    ]
    rows = []
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(serving(build_app(engine))) for name, engine in engines.items()}
        for _, server, loop in arms:
            phase(urls[server], server, 1, 1, args.max_tokens, loop)  # warm-up
        for level in levels:  # the arms take turns at each level, so a change in the machine's load hits all
            for name, server, loop in arms:
                row = {"arm": name, **phase(urls[server], server, level, max(args.requests, level), args.max_tokens,
                                             loop)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    baseline = {r["concurrency"]: r for r in rows if r["arm"] == arms[0][0]}
    for row in rows:
        ref = baseline[row["concurrency"]]
        row["p50_latency_vs_base"] = row["p50_latency_s"] / ref["p50_latency_s"]
        row["tokens_per_s_vs_base"] = row["tokens_per_s"] / ref["tokens_per_s"]

    print("\n| arm | clients | requests | p50 latency s | p99 latency s | p50 first token s | tokens/s | "
          "mean passes | p50 latency / base | tokens/s / base |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        passes = "-" if r["mean_passes"] is None else f"{r['mean_passes']:.2f}"
        print(f"| {r['arm']} | {r['concurrency']} | {r['requests']} | {r['p50_latency_s']:.2f} | "
              f"{r['p99_latency_s']:.2f} | {r['p50_ttft_s']:.2f} | {r['tokens_per_s']:.1f} | {passes} | "
              f"{r['p50_latency_vs_base']:.2f} | {r['tokens_per_s_vs_base']:.2f} |")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, **vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}; {meta['date']}, {meta['machine']}, {meta['torch_threads']} torch threads")


if __name__ == "__main__":
    main()
