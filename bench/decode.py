"""Looped decoding benchmark on the real Gemma 3 270M (issue 3).

Measures, side by side in one run (CPU timings are noisy: compare the ratios, not the seconds):

  1. seconds per generated token at budget B=8 with and without the KV cache, for each --new-tokens;
  2. cached decode time of LoopUS at budget B over the base model's own `generate`, for each
     --budgets, against the FLOP-ideal ratio (encoder + B x reasoning + decoder + head) / (all layers + head);
  3. adaptive exit: mean loop passes per token, time per token and held-out perplexity
     (teacher-forced, token by token through the cache, so exit happens exactly as in decoding)
     against the fixed budget B=8, plus the constant-memory KV mode's perplexity;
  4. KV bytes against B for the per-depth and the constant-memory ("shared") modes.

    python bench/decode.py --out runs/bench_decode.json

Part 1 per-token costs: a full uncached run of 256 tokens at B=8 takes far too long on a shared
CPU, so for both modes the seconds per token of an N-token generation are the mean per-step cost
over its context lengths, from the timed step at the first, middle and last context length
(Simpson's rule; the step cost is close to linear in the context): without a cache one full forward
over the context, with a cache one decode step on a cache prefilled with the context (median of 3).
--generate-check N also times a real cached `generate` of up to N tokens as a cross-check, and
--uncached-full N a real uncached one.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import loopus
from loopus.eval.scoring import teacher_forced
from loopus.paths import data_file
from loopus.train.flops import decode_step_flops
from loopus.zoo import load_base


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


class StepClock:
    """A streamer that timestamps every generated token; decode time excludes the prefill."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def per_token(self) -> float:
        steps = self.times[1:]  # times[0]: the prompt is handed over before any work
        return (steps[-1] - steps[0]) / (len(steps) - 1)


def decode_seconds(model, ids, new_tokens: int, **kwargs) -> tuple[float, object]:
    clock = StepClock()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, streamer=clock, return_dict_in_generate=True, **kwargs,
        )
    return clock.per_token(), out


def forward_seconds(model, ids, **kwargs) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1, **kwargs)
        return time.perf_counter() - start


def cached_step_seconds(model, ids, repeats: int = 3, **kwargs) -> float:
    """Median time of the cached decode step that adds token ids[:, -1] to a cache holding ids[:, :-1]."""
    cache = model.new_cache(kwargs.get("num_loops"))
    times = []
    with torch.no_grad():
        model(input_ids=ids[:, :-1], past_key_values=cache, logits_to_keep=1, **kwargs)
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids[:, -1:], past_key_values=cache, **kwargs)
            times.append(time.perf_counter() - start)
            cache.crop(-1)
    return statistics.median(times)


def render(report: dict) -> str:
    """The report as Markdown tables."""
    lines = [f"Split: encoder {report['split'][0]}, reasoning {report['reasoning_layers']}, decoder {report['split'][1]} "
             f"layers; {report['threads']} torch threads.", ""]
    if "cache_vs_nocache_B8" in report:
        lines += ["| new tokens | cached s/token | uncached s/token | uncached / cached |", "|---|---|---|---|"]
        for r in report["cache_vs_nocache_B8"]:
            lines.append(f"| {r['new_tokens']} | {r['cached_s_per_token']:.2f} | {r['uncached_s_per_token']:.2f} | "
                         f"{r['uncached_over_cached']:.1f} |")
        lines.append("")
    if "budget_over_base" in report:
        lines += ["| budget B | measured LoopUS / base (median) | FLOP-ideal | measured / ideal | all repeats |",
                  "|---|---|---|---|---|"]
        for r in report["budget_over_base"]:
            lines.append(f"| {r['budget']} | {r['measured']:.3f} | {r['ideal']:.3f} | {r['measured_over_ideal']:.3f} | "
                         f"{', '.join(f'{x:.2f}' for x in r['all_ratios'])} |")
        lines.append("")
    if "kv_bytes" in report:
        lines += ["| budget B | per_depth KV bytes | shared KV bytes |", "|---|---|---|"]
        for r in report["kv_bytes"]:
            lines.append(f"| {r['budget']} | {r['per_depth']:,} | {r['shared']:,} |")
        lines += [f"(base model DynamicCache for the same positions: {report['base_kv_bytes']:,} bytes)", ""]
    if "adaptive_exit" in report:
        lines += ["| config | held-out ppl | mean passes | s/token | time / fixed B=8 | passes histogram |",
                  "|---|---|---|---|---|---|"]
        for r in report["adaptive_exit"]:
            hist = " ".join(f"{k}:{v}" for k, v in sorted(r["histogram"].items(), key=lambda kv: int(kv[0])))
            lines.append(f"| {r['config']} | {r['ppl']:.2f} | {r['mean_passes']:.2f} | {r['seconds_per_token']:.2f} | "
                         f"{r['time_over_fixed_B8']:.2f} | {hist} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--encoder-layers", type=int, default=4)
    p.add_argument("--decoder-layers", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=ints, default=[32, 128, 256], help="part 1: generation lengths")
    p.add_argument("--uncached-full", type=int, default=0, help="also run uncached generate end to end up to N tokens")
    p.add_argument("--generate-check", type=int, default=32, help="also time a real cached generate up to N tokens")
    p.add_argument("--budgets", type=ints, default=[1, 2, 4, 8], help="part 2 and 4: loop budgets")
    p.add_argument("--ratio-tokens", type=int, default=24, help="part 2: new tokens per timed generation")
    p.add_argument("--repeats", type=int, default=3, help="part 2: interleaved repeats (median ratio)")
    p.add_argument("--ppl-tokens", type=int, default=64, help="part 3: held-out tokens scored")
    p.add_argument("--ppl-context", type=int, default=16, help="part 3: tokens prefilled before scoring")
    p.add_argument("--kl-threshold", type=float, default=0.05)
    p.add_argument("--convergence-threshold", type=float, default=0.2)
    p.add_argument("--kv-tokens", type=int, default=64, help="part 4: cached positions when KV bytes are read")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", default=None, help="data directory (default: $LOOPUS_DATA)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: cache,ratio,exit,kv")
    p.add_argument("--out", default="runs/bench_decode.json")
    p.add_argument("--render", default=None, help="only print the Markdown tables of an existing JSON report")
    args = p.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    skip = set(args.skip.split(",")) - {""}
    if args.threads:
        torch.set_num_threads(args.threads)

    base, tokenizer = load_base(args.model)
    model = loopus.convert(base, args.encoder_layers, args.decoder_layers).eval()
    text = data_file("wikitext2/wiki.test.raw", args.data).read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids  # BOS + text
    prompt = ids[:, : args.prompt_tokens]
    held_out = ids[:, 5000 : 5000 + args.ppl_context + args.ppl_tokens]
    held_out = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), held_out], dim=1)
    report = {
        "model": args.model, "split": [args.encoder_layers, args.decoder_layers],
        "reasoning_layers": len(model.config.reasoning_range), "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "args": vars(args),
    }
    # generate must not stop early on an EOS: min_new_tokens pins the length for both models
    gen = {"pad_token_id": tokenizer.pad_token_id}

    if "cache" not in skip:
        rows = []
        for n in args.new_tokens:
            lengths = [args.prompt_tokens, args.prompt_tokens + n // 2, args.prompt_tokens + n - 1]
            cached_steps, uncached_steps = [], []
            for length in lengths:
                uncached_steps.append(forward_seconds(model, ids[:, :length], num_loops=8))
                cached_steps.append(cached_step_seconds(model, ids[:, :length], num_loops=8))
            cached = (cached_steps[0] + 4 * cached_steps[1] + cached_steps[2]) / 6
            uncached = (uncached_steps[0] + 4 * uncached_steps[1] + uncached_steps[2]) / 6
            row = {"new_tokens": n, "context_lengths": lengths, "cached_s_per_token": cached,
                   "uncached_s_per_token": uncached, "uncached_over_cached": uncached / cached,
                   "cached_steps": cached_steps, "uncached_steps": uncached_steps}
            if n <= args.generate_check:
                row["cached_generate_s_per_token"], _ = decode_seconds(model, prompt, n, num_loops=8, **gen)
            if n <= args.uncached_full:
                row["uncached_generate_s_per_token"], _ = decode_seconds(
                    model, prompt, n, num_loops=8, use_cache=False, **gen
                )
            rows.append(row)
            print(f"[cache] B=8, {n} new tokens: cached {cached:.3f} s/tok, uncached {uncached:.3f} s/tok "
                  f"(x{uncached / cached:.1f}); steps cached {[round(x, 3) for x in cached_steps]} "
                  f"uncached {[round(x, 3) for x in uncached_steps]}"
                  + (f"; real cached generate {row['cached_generate_s_per_token']:.3f} s/tok"
                     if "cached_generate_s_per_token" in row else ""), flush=True)
        report["cache_vs_nocache_B8"] = rows

    if "ratio" not in skip:
        context = args.prompt_tokens + args.ratio_tokens // 2
        ideal = {b: decode_step_flops(model.config, b, context) / decode_step_flops(model.config, 1, context)
                 for b in args.budgets}
        ratios = {b: [] for b in args.budgets}
        base_times, loop_times = [], {b: [] for b in args.budgets}
        decode_seconds(base, prompt, 4, **gen)  # warm-up
        for r in range(args.repeats):
            for b in args.budgets:
                t_base, _ = decode_seconds(base, prompt, args.ratio_tokens, **gen)
                t_loop, _ = decode_seconds(model, prompt, args.ratio_tokens, num_loops=b, **gen)
                ratios[b].append(t_loop / t_base)
                base_times.append(t_base)
                loop_times[b].append(t_loop)
                print(f"[ratio] repeat {r + 1} B={b}: {t_loop / t_base:.3f} (ideal {ideal[b]:.3f})", flush=True)
        report["budget_over_base"] = [
            {"budget": b, "measured": statistics.median(ratios[b]), "ideal": ideal[b],
             "measured_over_ideal": statistics.median(ratios[b]) / ideal[b], "all_ratios": ratios[b],
             "loopus_s_per_token": statistics.median(loop_times[b])}
            for b in args.budgets
        ]
        report["base_s_per_token"] = statistics.median(base_times)

    if "kv" not in skip:
        kv = []
        seq = ids[:, : args.kv_tokens]
        for b in args.budgets:
            row = {"budget": b}
            for mode in ("per_depth", "shared"):
                cache = model.new_cache(b, mode)
                with torch.no_grad():
                    model(input_ids=seq[:, :-1], past_key_values=cache, num_loops=b, logits_to_keep=1)
                    model(input_ids=seq[:, -1:], past_key_values=cache, num_loops=b)  # one decode step
                row[mode] = cache.kv_bytes()
            kv.append(row)
            print(f"[kv] B={b}, {args.kv_tokens} positions: per_depth {row['per_depth']} B, shared {row['shared']} B",
                  flush=True)
        from transformers import DynamicCache

        base_cache = DynamicCache(config=base.config)
        with torch.no_grad():
            base(input_ids=seq, past_key_values=base_cache, use_cache=True)
        report["kv_bytes"] = kv
        report["base_kv_bytes"] = sum(
            layer.keys.numel() * layer.keys.element_size() * 2 for layer in base_cache.layers if layer.keys is not None
        )

    if "exit" not in skip:
        configs = [
            ("fixed B=8, per_depth", dict(budget=8, kv_mode="per_depth")),
            ("fixed B=8, shared KV", dict(budget=8, kv_mode="shared")),
            ("fixed B=1 (= base)", dict(budget=1, kv_mode="per_depth")),
            (f"kl < {args.kl_threshold}", dict(budget=8, kv_mode="per_depth", exit_strategy="kl",
                                               exit_threshold=args.kl_threshold)),
            (f"convergence < {args.convergence_threshold}",
             dict(budget=8, kv_mode="per_depth", exit_strategy="convergence",
                  exit_threshold=args.convergence_threshold)),
            ("cdf >= 0.9 (untrained head)", dict(budget=8, kv_mode="per_depth", exit_strategy="cdf",
                                                 exit_threshold=0.9)),
        ]
        rows = []
        for name, cfg in configs:
            result = teacher_forced(model, held_out, args.ppl_context + 1, **cfg)
            rows.append({"config": name, **result})
            print(f"[exit] {name}: ppl {result['ppl']:.2f}, mean passes {result['mean_passes']:.2f}, "
                  f"{result['seconds_per_token']:.3f} s/tok, histogram {result['histogram']}", flush=True)
        fixed = rows[0]
        for row in rows:
            row["time_over_fixed_B8"] = row["seconds_per_token"] / fixed["seconds_per_token"]
        report["adaptive_exit"] = rows

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(render(report))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
