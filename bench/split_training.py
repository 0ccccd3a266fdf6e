"""Issue 5 evidence, part 2: a short post-training run per split, then held-out perplexity per loop count.

Every split trains on the same enwiki tokens (same seed, same data order, same steps) and is scored
on two held-out texts: the WikiText-2 test prefix of `bench/split_choice.py`, and the start of
`enwiki/valid.jsonl` (the training corpus's own held-out documents, so no shift of style).

    LOOPUS_DATA=../shared/data python bench/split_training.py --splits 6,3 5,3 2,1 4,2 6,6 --steps 6

--reuse scores a split's model already in --out instead of training it again; --steps 0 scores the
untrained conversion.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from loopus.convert import convert
from loopus.eval.perplexity import per_loop_perplexity
from loopus.modeling import LoopUSForCausalLM
from loopus.paths import data_file
from loopus.train import TrainConfig, train
from loopus.text import read_jsonl_texts
from loopus.zoo import load_base


def held_out_texts(data: str | None) -> dict[str, str]:
    enwiki = read_jsonl_texts(data_file("enwiki/valid.jsonl", data), "text")
    return {"wikitext2_test": data_file("wikitext2/wiki.test.raw", data).read_text(),
            "enwiki_valid": "\n\n".join(itertools.islice(enwiki, 200))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--splits", nargs="+", default=["6,3", "5,3", "2,1", "4,2", "6,6"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024, help="held-out tokens scored per text")
    parser.add_argument("--loops", default="1,2,4")
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default="runs/split_training")
    parser.add_argument("--reuse", action="store_true", help="score models already trained in --out")
    args = parser.parse_args()

    texts = held_out_texts(args.data)
    _, tokenizer = load_base("gemma-3-270m")
    loops = [int(n) for n in args.loops.split(",")]
    rows = []
    for spec in args.splits:
        encoder, decoder = (int(x) for x in spec.split(","))
        out = Path(args.out) / f"split_{encoder}_{decoder}"
        start = time.perf_counter()
        if args.steps == 0:
            model = convert(load_base("gemma-3-270m")[0], encoder, decoder).eval()
        elif not (args.reuse and (out / "model.safetensors").is_file()):
            cfg = TrainConfig.of(
                model="gemma-3-270m", out=str(out), data=args.data, encoder_layers=encoder, decoder_layers=decoder,
                max_steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, warmup_steps=1,
                val_tokens=512, eval_loops=[1], eval_at_start=False, tensorboard=False, progress=False,
                depth_lora_rank=0, freeze=["embeddings", "encoder"],  # the full-weight recipe its figures used
            )
            train(cfg)
        if args.steps > 0:
            model = LoopUSForCausalLM.from_pretrained(out).eval()
        row = {"split": [encoder, decoder], "steps": args.steps,
               "train_tokens": args.steps * args.seq_len * args.batch_size}
        for name, text in texts.items():
            ppl = per_loop_perplexity(model, tokenizer, text, loops, max_tokens=args.tokens, progress=False)
            row[name] = {str(n): round(v["ppl"], 2) for n, v in ppl.items()}
        row["seconds"] = round(time.perf_counter() - start)
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
