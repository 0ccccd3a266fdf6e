"""`loopus run`: the main job, end to end on one base model, into a report directory.

    analyze -> convert -> post-train (LoopUS, and a dense baseline on the same tokens)
            -> evaluate base, dense and LoopUS (lm-eval, task subset) -> report (JSON, markdown, PNGs)

Each stage is a small function below. Entry points used (all keyword arguments are shown in the code):

    analyze   loopus.dynamics.analyze(base, tokenizer, data=, tokens=, out=) -> {"split": {...}}
    convert   loopus.convert(base, encoder_layers, decoder_layers) -> LoopUSForCausalLM
    train     loopus.train.TrainConfig.of(...); loopus.train.train(cfg)   (the default recipe, and the dense
              recipe for the baseline; the trained model is saved into cfg.out)
    evaluate  loopus.eval.harness.evaluate_hf / evaluate_loopus (lm-eval simple_evaluate, offline tasks)

Profiles: `quick` (CPU, <= 30 minutes on a 2-core machine) and `full` (the GPU recipe).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..deprecation import add_old_flag
from ..options import CALIBRATION_TOKENS

HELP = "the main job: analyze, convert, post-train, evaluate, report"

PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "analyze_tokens": CALIBRATION_TOKENS,
        # the recipe study's mix and recipe (loopus.train.recipes), 20k tokens, at most 2 rows per document so
        # that a short run reads many documents, not the first few; loops 2 and 4 show what extra loops do
        "train": {"max_steps": 40, "seq_len": 128, "batch_size": 4, "corpus": ["enwiki", "eltec_eng"],
                  "rows_per_doc": 2, "eval_loops": [1, 2, 4], "val_tokens": 1024},
        "tasks": ["arc_easy", "lambada_openai"],
        "limit": 15,
        "loops": [1, 2, 4],
        "exit_strategy": "threshold",
        "thresholds": [0.9],
        "ppl_tokens": 2048,
        "batch_size": 8,
    },
    "full": {
        "analyze_tokens": 16384,
        "train": {"max_tokens": 1_500_000_000, "seq_len": 2048, "batch_size": 16, "grad_accum": 4,
                  "eval_loops": [1, 2, 4, 8], "eval_every": 1000, "save_every": 1000, "warmup_steps": 200},
        "tasks": ["wikitext", "lambada_openai", "mmlu", "hellaswag", "arc_easy", "arc_challenge", "piqa",
                  "winogrande", "openbookqa"],
        "limit": None,
        "loops": [1, 2, 4, 8, 16],
        "exit_strategy": "threshold",
        "thresholds": [0.5, 0.7, 0.8, 0.9, 0.95],
        "ppl_tokens": None,
        "batch_size": 32,
    },
}

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help=HELP)
    p.add_argument("--model", default="gemma-3-270m", help="base model: embedded name, directory or hub id")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--encoder-layers", type=int, default=None, help="override the analyzed split")
    p.add_argument("--decoder-layers", type=int, default=None, help="override the analyzed split")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (default: the profile's)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (default: the profile's)")
    loops = p.add_argument("--num-loops", default=None,
                           help="loop budgets to evaluate, e.g. 1,2,4 (default: the profile's)")
    add_old_flag(p, "--loops", loops)
    p.add_argument("--train-steps", type=int, default=None, help="optimiser steps (default: the profile's)")
    p.add_argument("--skip", default="", help="stages to skip: analyze,train,dense,evaluate")
    p.add_argument("--data", default=None, help="data directory (default: $LOOPUS_DATA)")
    p.add_argument("--out", default="runs/main", help="report directory")
    p.set_defaults(handler=run)


class Progress:
    """One line per stage with elapsed time; stages' own tqdm bars show progress inside a stage."""

    def __init__(self, stages: list[str]):
        self.stages, self.start, self.log = stages, time.time(), []

    def begin(self, stage: str, what: str) -> float:
        i = self.stages.index(stage) + 1
        print(f"\n[{i}/{len(self.stages)} {stage}] {what}  (t+{time.time() - self.start:.0f}s)", flush=True)
        return time.time()

    def end(self, stage: str, status: str, since: float, detail: str = "") -> None:
        seconds = round(time.time() - since, 1)
        self.log.append({"stage": stage, "status": status, "seconds": seconds, "detail": detail})
        print(f"[{stage}] {status} in {seconds}s{': ' + detail if detail else ''}", flush=True)


# -- stages -------------------------------------------------------------------------------------


def stage_analyze(base, tokenizer, data: str, tokens: int, out: Path) -> tuple[int, int, dict]:
    from loopus.dynamics import analyze

    result = analyze(base, tokenizer, data=data, tokens=tokens, out=out)
    split = result["split"]
    return int(split["encoder_layers"]), int(split["decoder_layers"]), result


def stage_convert(base, tokenizer, encoder_layers: int, decoder_layers: int, out: Path):
    from loopus import convert

    model = convert(base, encoder_layers, decoder_layers).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def stage_train(model_dir: Path, out: Path, mode: str, data: str, settings: dict) -> dict:
    from loopus.train import TrainConfig, train

    # LoopUS trains the default recipe (TrainConfig's defaults), the baseline the dense recipe
    recipe = {"recipe": "dense"} if mode == "dense" else {"mode": mode}
    return train(TrainConfig.of(model=str(model_dir), out=str(out), data=data, **recipe, **settings))


def stage_evaluate(models: dict[str, tuple[str, Path]], tasks: list[str], limit, loops, exit_strategy,
                   thresholds, batch_size: int, data: str) -> tuple[dict, dict]:
    """models: {label: ("hf"|"loopus", dir)} -> ({label: {task: {metric: v}}}, {label: loopus sweep})."""
    from loopus.eval.harness import evaluate_hf, evaluate_loopus

    table, sweeps = {}, {}
    for label, (kind, path) in models.items():
        if kind == "hf":
            table[label] = evaluate_hf(str(path), tasks, limit, batch_size, data=data)
            continue
        sweep = evaluate_loopus(str(path), tasks, loops, limit, exit_strategy, thresholds, batch_size=batch_size,
                                data=data)
        sweeps[label] = sweep
        for n, metrics in sweep["loops"].items():
            table[f"{label} (loops={n})"] = metrics
    return table, sweeps


def stage_held_out(models: dict[str, Path], tokenizer, split: tuple[int, int], loops: list[int],
                   tokens: int | None, data: str) -> dict:
    """Held-out perplexity ± standard error of each model: {corpus: {label: {loops: scores}}}.

    Every held-out document is scored in BOS-led 512-token windows (the regime the model is used in).
    A plain model is recast with the run's split and scored at one loop, which is exactly the model.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from loopus.convert import as_looped
    from loopus.eval.perplexity import HELD_OUT, held_out_documents, per_loop_perplexity
    from loopus.looped import looped_view

    documents = {corpus: held_out_documents(corpus, data) for corpus in HELD_OUT}
    result: dict[str, dict] = {corpus: {} for corpus in HELD_OUT}
    for label, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        counts = looped_view(model).loop_counts(loops)
        model = as_looped(model, *split).eval()
        for corpus, docs in documents.items():
            scores = per_loop_perplexity(model, tokenizer, docs, counts, max_tokens=tokens)
            result[corpus][label] = {str(n): v for n, v in scores.items()}
    return result


def held_out_rows(held_out: dict) -> list[dict]:
    return [{"corpus": corpus, "model": label, "num_loops": n, "ppl": round(v["ppl"], 3),
             "se": round(v["ppl"] * v["nll_se"], 3), "tokens": v["tokens"]}
            for corpus, by_model in held_out.items() for label, by_loops in by_model.items()
            for n, v in by_loops.items()]


def held_out_curves(held_out: dict) -> tuple[dict, dict]:
    """LoopUS's held-out perplexity by loop count, and the other models' (at their one loop) as reference
    lines, in the plots' {task: {metric: value}} shape with the corpus as the task."""
    def metrics(v: dict) -> dict:
        return {"perplexity": v["ppl"], "perplexity_stderr": v["ppl"] * v["nll_se"]}

    curve: dict[int, dict] = {}
    references: dict[str, dict] = {}
    for corpus, by_model in held_out.items():
        for n, v in by_model.get("loopus", {}).items():
            curve.setdefault(int(n), {})[corpus] = metrics(v)
        for label, by_loops in by_model.items():
            if label != "loopus":
                references.setdefault(label, {})[corpus] = metrics(by_loops["1"])
    return curve, references


# -- the job ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval.harness import write_eval_report
    from ..eval.report import markdown_table, metric_rows, plot_metric_vs_loops, write_json
    from ..paths import data_dir
    from ..zoo import load_base, resolve

    profile = PROFILES[args.profile]
    data = str(data_dir(args.data).resolve())
    tasks = args.tasks.split(",") if args.tasks else profile["tasks"]
    limit = args.limit if args.limit is not None else profile["limit"]
    loops = [int(x) for x in args.num_loops.split(",")] if args.num_loops else profile["loops"]
    train_settings = dict(profile["train"])
    if args.train_steps is not None:
        train_settings.pop("max_tokens", None)
        train_settings["max_steps"] = args.train_steps
    skip = {s for s in args.skip.split(",") if s}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.profile == "full" and not torch.cuda.is_available():
        print("warning: the full profile is the GPU recipe; on this machine it will take days")

    progress = Progress(["analyze", "convert", "train", "dense", "evaluate", "report"])
    report: dict[str, Any] = {"model": args.model, "profile": args.profile, "tasks": tasks, "limit": limit,
                              "loops": loops, "stages": progress.log, "notes": []}

    base, tokenizer = load_base(args.model)
    base_dir = resolve(args.model)

    # 1. analyze
    t = progress.begin("analyze", "representation dynamics -> encoder / reasoning / decoder split")
    split = (args.encoder_layers, args.decoder_layers)
    if None not in split:
        progress.end("analyze", "skipped", t, f"split given: encoder {split[0]}, decoder {split[1]}")
    elif "analyze" in skip:
        split = (2, 1)
        report["notes"].append("split not analyzed (skipped by --skip); default encoder 2, decoder 1 used")
        progress.end("analyze", "skipped", t, "--skip")
    else:
        e, d, result = stage_analyze(base, tokenizer, data, profile["analyze_tokens"], out / "analyze")
        split = (args.encoder_layers or e, args.decoder_layers or d)
        report["analysis"] = {"split": result["split"], "reasons": result.get("reasons")}
        progress.end("analyze", "done", t, f"encoder {split[0]}, decoder {split[1]} layers")
    report["split"] = {"encoder_layers": split[0], "decoder_layers": split[1]}

    # 2. convert
    t = progress.begin("convert", f"{args.model} -> LoopUS (encoder {split[0]}, decoder {split[1]})")
    converted_dir = out / "converted"
    model = stage_convert(base, tokenizer, split[0], split[1], converted_dir)
    progress.end("convert", "done", t, str(converted_dir))

    # 3. post-train LoopUS, 4. dense baseline on the same tokens
    loopus_dir, dense_dir = converted_dir, None
    for stage, mode, source in (("train", "loopus", converted_dir), ("dense", "dense", Path(base_dir))):
        t = progress.begin(stage, f"{mode} post-training, {train_settings}")
        if stage in skip:
            progress.end(stage, "skipped", t, "--skip")
            continue
        # the dense baseline gets the split too, so --freeze encoder freezes the same layers as in LoopUS
        settings = {**train_settings, "encoder_layers": split[0], "decoder_layers": split[1]}
        metrics = stage_train(source, out / f"train-{mode}", mode, data, settings)
        report.setdefault("training", {})[mode] = metrics
        if mode == "loopus":
            loopus_dir = out / f"train-{mode}"
        else:
            dense_dir = out / f"train-{mode}"
        progress.end(stage, "done", t, str(out / f"train-{mode}"))
    if loopus_dir == converted_dir:
        report["notes"].append("LoopUS was not post-trained: the LoopUS rows are the untrained conversion")

    # 5. evaluate
    t = progress.begin("evaluate", f"lm-eval {tasks}, limit {limit}, base / dense / LoopUS loops {loops}")
    if "evaluate" in skip:
        progress.end("evaluate", "skipped", t, "--skip")
        table, sweeps = {}, {}
    else:
        models = {"base": ("hf", Path(base_dir))}
        if dense_dir is not None:
            models["dense"] = ("hf", dense_dir)
        models["loopus"] = ("loopus", loopus_dir)
        del model, base
        table, sweeps = stage_evaluate(models, tasks, limit, loops, profile["exit_strategy"], profile["thresholds"],
                                       profile["batch_size"], data)
        progress.end("evaluate", "done", t)
    report["results"] = table

    # 6. report
    t = progress.begin("report", f"JSON, markdown and plots into {out}")
    scored = {"base": Path(base_dir), **({"dense": dense_dir} if dense_dir is not None else {}), "loopus": loopus_dir}
    held_out = stage_held_out(scored, tokenizer, split, loops, profile["ppl_tokens"], data)
    report["held_out_perplexity"] = held_out
    sweep = sweeps.get("loopus", {"loops": {}, "points": []})
    # base and dense beside the looped curves in every plot
    references = {label: table[label] for label in ("base", "dense") if label in table}
    write_eval_report(out / "eval", {"settings": {"model": args.model, "profile": args.profile, "limit": limit},
                            **sweep, "references": references, "notes": report["notes"]}, f"LoopUS run: {args.model}")
    curve, held_out_references = held_out_curves(held_out)
    if curve:
        plot_metric_vs_loops(curve, out / "held_out_vs_loops.png", f"held-out perplexity: {args.model}",
                             held_out_references)
    write_json(report, out / "run.json")
    md = [f"# LoopUS run: {args.model} ({args.profile} profile)\n",
          f"Split: encoder {split[0]}, decoder {split[1]} layers. Tasks: {', '.join(tasks)}; limit {limit}.\n",
          "## Stages\n", markdown_table(progress.log)]
    if table:
        md += ["\n## Base vs dense vs LoopUS (lm-eval)\n", markdown_table(metric_rows(table))]
    md += [f"\n## Held-out perplexity (BOS-led 512-token windows inside each document, first "
           f"{profile['ppl_tokens'] or 'all'} tokens per corpus; se across windows)\n",
           markdown_table(held_out_rows(held_out))]
    md += ["\n## Notes\n"] + [f"- {n}" for n in report["notes"]]
    md += ["\nPlots (base and dense as reference lines): " + ("held_out_vs_loops.png, " if curve else "")
           + "eval/metric_vs_loops.png, eval/compute_vs_quality.png (details: eval/report.md)"
           + (", analyze/dynamics.png" if "analysis" in report else "")]
    (out / "report.md").write_text("\n".join(md) + "\n")
    progress.end("report", "done", t)
    write_json(report, out / "run.json")
    print("\n" + (out / "report.md").read_text())
    print(f"report written to {out}")
    return 0
