"""`loopus eval`: the friendly wrapper around lm-eval for LoopUS checkpoints.

    loopus eval runs/main/model --tasks arc_easy,piqa --limit 100 --num-loops 1,2,4,8 --out runs/eval
    loopus eval runs/main/model --tasks arc_easy --exit-strategy threshold --exit-threshold 0.5,0.8,0.95
    loopus eval gemma-3-270m --tasks wikitext            # a base model: lm-eval's hf model

Writes report.json, report.md, metric_vs_loops.png and compute_vs_quality.png into --out.
For every lm-eval flag, use `loopus lm-eval` instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..deprecation import add_old_flag
from ..options import EXIT_STRATEGIES
from ..train.options import parse_floats, parse_ints

DEFAULT_TASKS = "wikitext,lambada_openai,arc_easy,arc_challenge,piqa,hellaswag"
HELP = "evaluate a LoopUS (or base) model with lm-eval: tables and plots"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help=HELP)
    p.add_argument("model", help="LoopUS checkpoint directory, or a base model (embedded name / directory)")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated lm-eval tasks")
    p.add_argument("--limit", type=float, default=None, help="documents per task (lm-eval --limit; default: all)")
    loops = p.add_argument("--num-loops", type=parse_ints, default=None,
                           help="loop budgets to sweep, e.g. 1,2,4 (default: 1,2,4,8)")
    p.add_argument("--exit-strategy", default=None, help=f"per-token adaptive exit ({', '.join(EXIT_STRATEGIES)}), "
                   "swept over --exit-threshold (default: none)")
    threshold = p.add_argument("--exit-threshold", type=parse_floats, default=[],
                               help="exit thresholds to sweep at the largest --num-loops, e.g. 0.5,0.8,0.95 "
                                    "(default: the strategy's own)")
    p.add_argument("--min-loops", type=int, default=None, help="fewest loops before a token may exit (default: 1)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--data", default=None, help="data directory (default: $LOOPUS_DATA)")
    p.add_argument("--out", default="runs/eval", help="report directory")
    add_old_flag(p, "--loops", loops)
    add_old_flag(p, "--thresholds", threshold)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import check_model_path, is_loopus_checkpoint
    from ..eval.harness import evaluate_hf, evaluate_loopus, write_eval_report
    from ..paths import data_dir

    check_model_path(args.model)
    data = data_dir(args.data).resolve()
    tasks = [t for t in args.tasks.split(",") if t]
    settings = {"model": args.model, "tasks": ",".join(tasks), "limit": args.limit}
    if is_loopus_checkpoint(args.model):
        result = evaluate_loopus(
            args.model, tasks, args.num_loops, args.limit, args.exit_strategy, args.exit_threshold,
            min_loops=args.min_loops, batch_size=args.batch_size, device=args.device, data=data,
        )
        settings.update(loops=list(result["loops"]), exit_strategy=args.exit_strategy)
        report = {"settings": settings, **result}
    else:
        if args.num_loops or args.exit_strategy or args.exit_threshold:
            raise ValueError(f"{args.model} is not a LoopUS checkpoint: loops and exit settings don't apply "
                             "(convert it first to sweep loop counts: loopus convert MODEL --encoder-layers E "
                             "--decoder-layers D --out DIR)")
        metrics = evaluate_hf(args.model, tasks, args.limit, args.batch_size, args.device, data=data)
        report = {"settings": {**settings, "lm_eval_model": "hf"}, "base": metrics, "loops": {}, "points": []}
    files = write_eval_report(args.out, report, f"lm-eval: {Path(args.model).name}")
    if report.get("base"):
        from ..eval.report import markdown_table, metric_rows

        with open(files["markdown"], "a") as f:
            f.write("\n" + markdown_table(metric_rows({"hf": report["base"]})))
    sys.stdout.write(Path(files["markdown"]).read_text())
    print(f"report written to {args.out}")
    return 0
