"""Issue 5 evidence, part 2: a short post-training run per split, then held-out perplexity per loop count.

Every split trains on the same enwiki tokens (same seed, same data order, same steps) and is scored
on the same WikiText-2 test prefix as `bench/split_choice.py`.

    LOOPUS_DATA=../shared/data python bench/split_training.py --splits 6,3 5,3 2,1 4,2 6,6 --steps 6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from loopus.eval.perplexity import per_loop_perplexity
from loopus.modeling import LoopUSForCausalLM
from loopus.paths import data_file
from loopus.train import TrainConfig, train
from loopus.zoo import load_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--splits", nargs="+", default=["6,3", "5,3", "2,1", "4,2", "6,6"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024, help="held-out WikiText-2 test tokens")
    parser.add_argument("--loops", default="1,2,4")
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default="runs/split_training")
    args = parser.parse_args()

    text = data_file("wikitext2/wiki.test.raw", args.data).read_text()
    _, tokenizer = load_base("gemma-3-270m")
    loops = [int(n) for n in args.loops.split(",")]
    rows = []
    for spec in args.splits:
        encoder, decoder = (int(x) for x in spec.split(","))
        out = Path(args.out) / f"split_{encoder}_{decoder}"
        start = time.perf_counter()
        cfg = TrainConfig(
            model="gemma-3-270m", out=str(out), data=args.data, encoder_layers=encoder, decoder_layers=decoder,
            max_steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, warmup_steps=1,
            val_tokens=512, eval_loops=[1], eval_at_start=False, tensorboard=False, progress=False,
        )
        train(cfg)
        model = LoopUSForCausalLM.from_pretrained(out).eval()
        ppl = per_loop_perplexity(model, tokenizer, text, loops, max_tokens=args.tokens, progress=False)
        row = {"split": [encoder, decoder], "steps": args.steps, "train_tokens": args.steps * args.seq_len * args.batch_size,
               "ppl": {str(n): round(v["ppl"], 2) for n, v in ppl.items()}, "seconds": round(time.perf_counter() - start)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
