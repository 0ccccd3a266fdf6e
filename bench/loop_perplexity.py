"""Issue-2 figures on the real Gemma 3 270M: one-loop exactness and untrained per-loop perplexity.

    python bench/loop_perplexity.py --encoder-layers 2 --decoder-layers 1 --tokens 4096
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import loopus
from loopus.eval.perplexity import per_loop_perplexity
from loopus.paths import data_file
from loopus.zoo import load_base

PROMPTS = [
    "The capital of France is",
    "In 1905, Albert Einstein published four papers that changed physics.",
    "Hi",
    "A looped transformer applies the same block several times to refine",
]


def exactness(base, tokenizer, model) -> dict[str, float]:
    """Max |logit difference| over real tokens, num_loops=1 vs the base model, per padding side."""
    diffs = {}
    for side in ("left", "right"):
        tokenizer.padding_side = side
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            expected = base(**batch).logits
            got = model(**batch, num_loops=1, use_cache=False).logits
        diffs[side] = (got - expected)[batch["attention_mask"].bool()].abs().max().item()
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--encoder-layers", type=int, default=2)
    parser.add_argument("--decoder-layers", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=4096, help="wikitext-2 test prefix length in tokens")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--loops", default="1,2,4,8")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()

    base, tokenizer = load_base("gemma-3-270m")
    model = loopus.convert(base, args.encoder_layers, args.decoder_layers).eval()
    diffs = exactness(base, tokenizer, model)
    text = data_file("wikitext2/wiki.test.raw", args.data).read_text()
    start = time.perf_counter()
    loops = [int(n) for n in args.loops.split(",")]
    ppl = per_loop_perplexity(model, tokenizer, text, loops, max_tokens=args.tokens, window=args.window)
    result = {
        "split": [args.encoder_layers, args.decoder_layers],
        "exactness_max_abs_logit_diff": diffs,
        "tokens": args.tokens,
        "window": args.window,
        "per_loop": {str(n): round(v["ppl"], 3) for n, v in ppl.items()},
        "seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
