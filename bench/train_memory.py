"""Peak memory of one training step vs the loop horizon T: random deep supervision vs full BPTT.

    python bench/train_memory.py                 # synthetic Gemma-3-shaped model, CPU
    python bench/train_memory.py --real          # the embedded Gemma 3 270M (slow on CPU)

Every (method, T) runs in a fresh Python process (peak RSS cannot be reset reliably inside one
process: freed memory stays mapped in the allocator), with the same supervised count |S| = 2
(steps T/2 and T) for RDS. Full BPTT is one supervised step at T with the gradient window over
all T loop steps. Three measures per step:

Large blocks are served by mmap (MALLOC_MMAP_THRESHOLD_=128 KiB by default here), so freed tensors
leave the RSS at once and the RSS peak tracks live memory rather than allocator caching.

- `rss_peak`: the process's peak resident set size (VmHWM) during the step, including weights;
- `rss_growth`: VmHWM during the step minus RSS just before it (VmHWM reset via /proc/self/clear_refs),
  i.e. what the step itself added;
- `graph`: the largest number of bytes autograd held for one backward (saved-tensor hooks),
  the activation memory that BPTT multiplies by T;
- on a GPU, `cuda_peak` = torch.cuda.max_memory_allocated during the step.
Target (issue 4): peak(T=32) / peak(T=4) <= 1.10 under RDS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, torch
torch.set_num_threads(1)
import loopus
from transformers import AutoModelForCausalLM, Gemma3TextConfig
from loopus.train.objective import RDSPlan, rds_step
from loopus.train.params import apply_freeze

args = json.loads(sys.argv[1])
torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
if args["real"]:
    from loopus.zoo import load_base
    base, _ = load_base("gemma-3-270m")
    enc, dec = 4, 2
else:
    cfg = Gemma3TextConfig(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                           sliding_window=128, tie_word_embeddings=True)
    base = AutoModelForCausalLM.from_config(cfg)
    enc, dec = 2, 2
model = loopus.convert(base, enc, dec).train().to(device)
apply_freeze(model, {"embeddings", "encoder"})
ids = torch.randint(0, model.config.base_config.vocab_size, (1, args["seq"] + 1), device=device)
inputs, labels = ids[:, :-1], ids[:, 1:]
T = args["T"]
plan = RDSPlan(T, (T // 2, T)) if args["method"] == "rds" else RDSPlan(T, (T,), grad_steps=T)

def rss():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

# warm-up at T=2 so gradient buffers and allocator pools exist before the measured step
rds_step(model, inputs, labels, RDSPlan(2, (1, 2)))
for p in model.parameters():
    if p.grad is not None:
        p.grad.zero_()
graph = [0, 0]
def pack(t):
    graph[0] += t.numel() * t.element_size()
    return t
def backward(loss):
    graph[1] = max(graph[1], graph[0]); graph[0] = 0
    loss.backward()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before, _ = rss()
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    rds_step(model, inputs, labels, plan, backward=backward)
_, peak = rss()
out = {"rss_before": before, "rss_peak": peak, "rss_growth": peak - before, "graph": graph[1]}
if device == "cuda":
    out["cuda_peak"] = torch.cuda.max_memory_allocated()
print("RESULT " + json.dumps(out))
"""


def run(method: str, horizon: int, seq: int, real: bool, mmap_threshold: int) -> dict:
    arg = json.dumps({"method": method, "T": horizon, "seq": seq, "real": real})
    env = dict(os.environ)
    if mmap_threshold > 0:
        # glibc serves blocks above this size with mmap and returns them to the OS on free, so RSS
        # follows the live tensors instead of the allocator's high-water mark
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    proc = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{method} T={horizon} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][7:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--horizons", default="4,8,16,32")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--real", action="store_true")
    p.add_argument("--no-bptt", action="store_true")
    p.add_argument("--mmap-threshold", type=int, default=131072,
                   help="MALLOC_MMAP_THRESHOLD_ for the measured processes (0: glibc default)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    horizons = [int(t) for t in args.horizons.split(",")]
    methods = ["rds"] + ([] if args.no_bptt else ["bptt"])
    results = {m: {t: run(m, t, args.seq, args.real, args.mmap_threshold) for t in horizons} for m in methods}
    mib = 2**20
    print("| method | T | peak RSS (MiB) | step's RSS growth (MiB) | autograd graph per backward (MiB) |")
    print("|---|---|---|---|---|")
    for m in methods:
        for t in horizons:
            r = results[m][t]
            print(f"| {m} | {t} | {r['rss_peak'] / mib:.0f} | {r['rss_growth'] / mib:.1f} | {r['graph'] / mib:.1f} |")
    lo, hi = horizons[0], horizons[-1]
    for m in methods:
        r = results[m]
        print(f"{m}: peak RSS T={hi}/T={lo} = {r[hi]['rss_peak'] / r[lo]['rss_peak']:.3f}; "
              f"step growth T={hi}/T={lo} = {r[hi]['rss_growth'] / max(r[lo]['rss_growth'], 1):.3f}; "
              f"graph T={hi}/T={lo} = {r[hi]['graph'] / r[lo]['graph']:.3f}")
    if args.out:
        from loopus.eval.report import write_json

        write_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
