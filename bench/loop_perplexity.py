"""Function preservation on the real Gemma 3 270M: one-loop exactness and untrained per-loop perplexity.

    python bench/loop_perplexity.py --encoder-layers 2 --decoder-layers 1 --tokens 4096
    python bench/loop_perplexity.py --encoder-layers 6 --decoder-layers 3 --corpus eltec_eng \
        --gate-init 0.02,0.01,0.005 --gate-floor 0 --loops 1,2,4,8,16

Each conversion setting (gate init x floor x input injection) is scored on the same held-out tokens; the
drift of loop count n is its perplexity against one loop's, which must stay within 0.5%.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import loopus
from loopus.eval.perplexity import HELD_OUT, held_out_documents, per_loop_perplexity
from loopus.train.options import parse_floats
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
    parser.add_argument("--tokens", type=int, default=4096, help="held-out prefix length in tokens")
    parser.add_argument("--corpus", default="wikitext2", choices=sorted(HELD_OUT), help="held-out text to score")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--loops", default="1,2,4,8")
    parser.add_argument("--gate-init", default=None, help="comma list of gate inits (default: the config's)")
    parser.add_argument("--gate-floor", default="0", help="comma list of gate floors")
    parser.add_argument("--input-injection", action="store_true", help="convert with input injection")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()

    base, tokenizer = load_base("gemma-3-270m")
    documents = held_out_documents(args.corpus, args.data)
    loops = [int(n) for n in args.loops.split(",")]
    inits = parse_floats(args.gate_init) if args.gate_init else (loopus.LoopUSConfig().gate_init,)
    settings = []
    for gate_init in inits:
        for gate_floor in parse_floats(args.gate_floor):
            if gate_floor >= gate_init:
                continue
            model = loopus.convert(base, args.encoder_layers, args.decoder_layers, gate_init=gate_init,
                                   gate_floor=gate_floor, input_injection=args.input_injection).eval()
            start = time.perf_counter()
            ppl = per_loop_perplexity(model, tokenizer, documents, loops, max_tokens=args.tokens, window=args.window)
            one = ppl[loops[0]]["ppl"]
            settings.append({
                "gate_init": gate_init, "gate_floor": gate_floor, "input_injection": args.input_injection,
                "exactness_max_abs_logit_diff": exactness(base, tokenizer, model),
                "per_loop": {str(n): round(v["ppl"], 3) for n, v in ppl.items()},
                "drift_vs_first_pct": {str(n): round(100 * (v["ppl"] / one - 1), 3) for n, v in ppl.items()},
                "seconds": round(time.perf_counter() - start, 1),
            })
    result = {
        "split": [args.encoder_layers, args.decoder_layers],
        "corpus": args.corpus,
        "tokens": args.tokens,
        "window": args.window,
        "settings": settings,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
