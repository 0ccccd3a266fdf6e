"""Evidence for `loopus analyze`: does the chosen split loop better than the alternatives?

For the split chosen from the base model's representation dynamics and a list of alternatives
(including the authors' rule of thumb, 2 encoder / 1 decoder layers), convert the base model
without training and measure its perplexity on held-out text (WikiText-2 test, disjoint windows)
at several loop counts. Results are appended one split per line to `--out`/results.jsonl as they
finish, then summarised in results.md and a PNG.

    python bench/split_choice.py --data /work/shared/data --out runs/issue5/bench \
        --analyze runs/issue5/analyze --splits 2,1 4,2 4,4 6,4 --tokens 1024

If `--analyze DIR` has no split.json, `loopus analyze` runs first and writes it there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_split(text: str) -> tuple[int, int]:
    e, d = text.split(",")
    return int(e), int(d)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--data", default=None, help="data directory (default: $LOOPUS_DATA)")
    p.add_argument("--out", default="runs/issue5/bench")
    p.add_argument("--analyze", default="runs/issue5/analyze", help="directory with (or for) split.json")
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--splits", nargs="*", type=parse_split, default=[(2, 1), (4, 2), (4, 4), (6, 4), (6, 2)])
    p.add_argument("--tokens", type=int, default=1024, help="held-out WikiText-2 test tokens")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--loops", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args()

    from loopus.convert import convert
    from loopus.dynamics import analyze
    from loopus.eval.perplexity import per_loop_perplexity
    from loopus.paths import data_file
    from loopus.split import load_split
    from loopus.zoo import load_base

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_base(args.model)
    split_file = Path(args.analyze) / "split.json"
    if not split_file.exists():
        t0 = time.time()
        analyze(base, tokenizer, data=args.data, tokens=args.calibration_tokens, out=args.analyze, name=args.model)
        print(f"analyze took {time.time() - t0:.0f} s")
    chosen = load_split(split_file)
    print(f"chosen split: encoder {chosen[0]}, decoder {chosen[1]}")
    splits = [chosen] + [s for s in dict.fromkeys(args.splits) if s != chosen]
    text = data_file("wikitext2/wiki.test.raw", args.data).read_text()
    results_file = out / "results.jsonl"
    done = {}
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            row = json.loads(line)
            done[(row["encoder_layers"], row["decoder_layers"], row["tokens_requested"])] = row
    for e, d in splits:
        if (e, d, args.tokens) in done:
            continue
        t0 = time.time()
        model = convert(base, e, d).eval()
        ppl = per_loop_perplexity(model, tokenizer, text, args.loops, max_tokens=args.tokens, window=args.window)
        row = {
            "encoder_layers": e,
            "decoder_layers": d,
            "reasoning_layers": base.config.num_hidden_layers - e - d,
            "chosen": (e, d) == chosen,
            "tokens_requested": args.tokens,
            "window": args.window,
            "ppl": {str(n): r["ppl"] for n, r in ppl.items()},
            "scored_tokens": next(iter(ppl.values()))["tokens"],
            "seconds": round(time.time() - t0, 1),
        }
        done[(e, d, args.tokens)] = row
        with results_file.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    rows = [dict(done[(e, d, args.tokens)], chosen=(e, d) == chosen) for e, d in splits]
    write_summary(rows, args, out)


def write_summary(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    loops = [str(n) for n in args.loops]
    ranks = {}
    for n in loops:
        order = sorted(rows, key=lambda r: r["ppl"][n])
        for i, r in enumerate(order, 1):
            ranks[(r["encoder_layers"], r["decoder_layers"], n)] = i
    head = "| split (encoder, reasoning, decoder) | " + " | ".join(
        f"ppl@{n}" + (" (rank)" if n != "1" else "") for n in loops) + " |"
    lines = [head, "|" + "---|" * (len(loops) + 1)]
    for r in rows:
        key = (r["encoder_layers"], r["decoder_layers"])
        name = f"({r['encoder_layers']}, {r['reasoning_layers']}, {r['decoder_layers']})"
        if r["chosen"]:
            name += " **chosen**"
        if key == (2, 1):
            name += " authors' rule"
        cells = [f"{r['ppl'][n]:.2f}" + (f" ({ranks[key + (n,)]})" if n != "1" else "") for n in loops]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "results.md").write_text(
        f"Untrained conversion of {args.model}, WikiText-2 test, first {args.tokens} tokens "
        f"({rows[0]['scored_tokens']} scored), disjoint windows of {args.window}.\n\n{table}\n"
    )
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [n for n in loops if n != "1"] or loops
    order = sorted(rows, key=lambda r: r["ppl"][shown[-1]])
    names = [f"({r['encoder_layers']},{r['reasoning_layers']},{r['decoder_layers']})" for r in order]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 0.35 * len(rows) + 1.6), squeeze=False)
    for ax, n in zip(axes[0], shown):
        colours = ["#e76f51" if r["chosen"] else ("#8d99ae" if (r["encoder_layers"], r["decoder_layers"]) == (2, 1)
                   else "#457b9d") for r in order]
        values = [r["ppl"][n] for r in order]
        ax.barh(range(len(order)), values, color=colours)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
        ax.set_yticks(range(len(order)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"perplexity at num_loops={n}")
        ax.set_xlim(0, max(values) * 1.15)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0][0].set_ylabel("split (encoder, reasoning, decoder)")
    fig.suptitle(f"{args.model}, untrained: WikiText-2 test, {rows[0]['scored_tokens']} tokens "
                 "(orange = chosen by loopus analyze, grey = 2/1 rule)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "split_choice.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
