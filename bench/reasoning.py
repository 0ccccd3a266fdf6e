"""The study of where loops pay: arms fine-tuned on reasoning that needs depth, scored past the trained depth.

Every arm trains on the same examples in the same order (one data file, seed, steps x batch, sequence
length, lr and split: the study's settings, fixed in OUT/study.json by the first command), changing only
what its entry in ARMS says. Arms are scored on the same test items at every loop count and under each
adaptive exit rule (log-likelihood of the answer options, `loopus.eval.options_score`), so any two arms
compare item by item.

    python bench/reasoning.py --out runs/pq train dense      # writes the task's data first; resumes a run
    python bench/reasoning.py --out runs/pq score default --exit-limit 50   # OUT/ARM/scores.json (resumable)
    python bench/reasoning.py --out runs/pq forgetting dense # enwiki perplexity, arc_easy and piqa of an arm
    python bench/reasoning.py --out runs/pq report           # OUT/report.md, report.json and the figures
    python bench/reasoning.py --out runs/dc --task depthchain --train-depths 1-6 --test-depths 1-16 train default

Tasks: `prontoqa` trains on the ladder's 1-3 hops (`loopus make-task prontoqa_ladder`) and tests every hop
count of the data directory's prontoqa/{h}hop_test.jsonl (options " True" / " False"); `depthchain`
trains on k <= K and tests generated items at every depth (options " 0" .. " 9").

Scoring a LoopUS arm runs one forward per item to the largest loop count (decoding after each asked
one), plus, for the exit rules, one more forward at that budget per item: `--exit-limit N` scores the
rules on the first N items of each depth only. A plain model (dense, base) is scored at its one depth.

OUT layout:
    study.json                     the shared settings (a later command with other settings is refused)
    data/                          the training files (and depthchain's test file)
    ARM/model/                     `loopus train --out`: the final model, logs/train.jsonl, checkpoints/
    ARM/scores.json                per item: fixed loop counts and exit rules, log-likelihoods, correctness,
                                   loop passes (ARM/scores.partial.jsonl while scoring)
    ARM/forgetting.json            `forgetting`: enwiki perplexity and arc_easy/piqa accuracy
    report.md, report.json, *.png  `report` (bench/reasoning_report.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loopus.cli import main as loopus_main
from loopus.commands.make_task import depth_range
from loopus.options import DEFAULT_THRESHOLDS, EXIT_STRATEGIES
from loopus.tasks.depthchain import OPERATIONS
from loopus.train.options import parse_ints
from reasoning_report import write_report  # bench/, beside this script


@dataclass(frozen=True)
class Arm:
    """How one arm is trained: `recipe` (None: not trained, the model is scored as it is) and `loopus train`
    flags placed after the study's shared ones, so an arm may override any of them (e.g. its own --lr)."""

    recipe: str | None
    flags: tuple[str, ...] = ()
    model: str | None = None  # None: the study's base model


# The arms. Add one by name, recipe and flags; `base` and `dense` are the reference lines of every figure.
# Every trained arm trains the same base weights (all layers; the embeddings, tied to the head, stay
# frozen), so that the looped arms differ from dense only in what their recipe adds.
SAME_WEIGHTS = ("--freeze", "embeddings")
SMALL_BLOCK = ("--encoder-layers", "7", "--decoder-layers", "8")  # layers 7-9: the CKA plateau's core
ARMS: dict[str, Arm] = {
    "base": Arm(None),
    "dense": Arm("dense", SAME_WEIGHTS),
    "default": Arm("default", SAME_WEIGHTS),
    "iterate": Arm("iterate", SAME_WEIGHTS + SMALL_BLOCK),
    "iterate_wide": Arm("iterate", SAME_WEIGHTS),  # the recipe on the 9-layer block of the default split
}
REFERENCES = ("base", "dense")


@dataclass(frozen=True)
class Study:
    """What every arm shares (the depths default to TASK_DEPTHS of the task)."""

    task: str = "prontoqa"
    train_depths: tuple[int, ...] = (1, 2, 3)
    test_depths: tuple[int, ...] = (1, 2, 3, 4, 5)
    model: str = "gemma-3-270m"
    split: tuple[int, int] = (6, 3)
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 224
    lr: float = 5e-5
    seed: int = 0
    eval_every: int = 25
    eval_loops: tuple[int, ...] = (1, 4)
    valid_examples: int = 60
    save_every: int = 25
    train_size: int = 2000  # depthchain: generated train items per depth
    test_size: int = 200  # depthchain: generated test items per depth
    distractors: int = 3  # depthchain
    operation: str = "add"  # depthchain: "add" (modular sums) or "copy" (pointer chasing)

    @property
    def trained_depth(self) -> int:
        return max(self.train_depths)


TASK_DEPTHS = {"prontoqa": ((1, 2, 3), (1, 2, 3, 4, 5)), "depthchain": (tuple(range(1, 7)), tuple(range(1, 17)))}
OPTIONS = {"prontoqa": (" True", " False"), "depthchain": tuple(f" {d}" for d in range(10))}


def fail(message: str) -> None:
    raise SystemExit(f"reasoning.py: error: {message}")


def read_json(path: Path) -> Any:
    if not path.is_file():
        fail(f"{path} not found")
    return json.loads(path.read_text())


def study_settings(args: argparse.Namespace) -> Study:
    """The study of OUT: fixed by its study.json once written; flags that disagree with it are refused."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Study) if getattr(args, f.name) is not None}
    path = Path(args.out) / "study.json"
    if args.command == "report" and not path.is_file():
        fail(f"{path} not found: train or score an arm into {args.out} first")
    if path.is_file():
        stored = read_json(path)
        stored = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
        clash = {k: (v, stored.get(k)) for k, v in given.items() if stored.get(k) != v}
        if clash:
            fail(f"{path} fixes the study's settings and these flags disagree: "
                 + ", ".join(f"--{k.replace('_', '-')} {v} (study: {s})" for k, (v, s) in clash.items())
                 + ": drop them, or use another --out")
        return Study(**stored)
    task = given.get("task", Study.task)
    train_depths, test_depths = TASK_DEPTHS[task]
    study = Study(**{"train_depths": train_depths, "test_depths": test_depths, **given})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(study), indent=1) + "\n")
    return study


def arm_named(name: str) -> Arm:
    if name not in ARMS:
        fail(f"unknown arm {name!r}: the arms are {', '.join(ARMS)} (add one to ARMS in {__file__})")
    return ARMS[name]


def run_loopus(argv: list[str]) -> None:
    code = loopus_main(argv)
    if code:
        fail(f"`loopus {' '.join(argv)}` failed (exit {code})")


# -- data ------------------------------------------------------------------------------------------

def train_corpus(study: Study, out: Path, data: str | None) -> Path:
    """The training corpus folder (train.jsonl + valid.jsonl), written on first use."""
    root = out / "data"
    if study.task == "prontoqa":
        folder = root / "sft" / "prontoqa_ladder"
        argv = ["make-task", "prontoqa_ladder", "--train-hops", ",".join(map(str, study.train_depths))]
    else:
        folder = root / "depthchain"
        argv = ["make-task", "depthchain", "--train-depths", ",".join(map(str, study.train_depths)),
                "--test-depths", ",".join(map(str, study.test_depths)), "--train-size", str(study.train_size),
                "--test-size", str(study.test_size), "--distractors", str(study.distractors),
                "--operation", study.operation]
    if not (folder / "train.jsonl").is_file():
        run_loopus([*argv, "--out", str(root), "--seed", str(study.seed), *(["--data", data] if data else [])])
    return folder


def test_items(study: Study, out: Path, data: str | None, limit: int) -> list:
    """The first `limit` test items of every test depth, as scorer items (ids unique across depths)."""
    from loopus.eval.options_score import OptionItem
    from loopus.paths import data_file
    from loopus.tasks.files import read_jsonl
    from loopus.tasks.sft import prontoqa_row

    options = OPTIONS[study.task]
    items = []
    if study.task == "prontoqa":
        for h in study.test_depths:
            for r in read_jsonl(data_file(f"prontoqa/{h}hop_test.jsonl", data))[:limit]:
                row = prontoqa_row(r)
                items.append(OptionItem(row["prompt"], options, options.index(row["completion"]), h, f"{h}hop/{r['id']}"))
        return items
    path = train_corpus(study, out, data) / "test.jsonl"
    per_depth: dict[int, int] = {}
    for r in read_jsonl(path):
        if r["depth"] in study.test_depths and per_depth.get(r["depth"], 0) < limit:
            per_depth[r["depth"]] = per_depth.get(r["depth"], 0) + 1
            items.append(OptionItem(r["prompt"], options, options.index(r["completion"]), r["depth"], r["id"]))
    missing = sorted(set(study.test_depths) - set(per_depth))
    if missing:
        fail(f"{path} has no test items at depths {missing}")
    return items


# -- train -----------------------------------------------------------------------------------------

def model_dir(out: Path, name: str) -> Path:
    return out / name / "model"


def train_argv(study: Study, out: Path, name: str, arm: Arm, data: str | None) -> list[str] | None:
    """`loopus train` arguments of an arm; None when its final model is already there."""
    run = model_dir(out, name)
    if (run / "metrics.json").is_file():  # written last, after the final model
        return None
    corpus = train_corpus(study, out, data)
    argv = ["train", "--model", arm.model or study.model, "--recipe", arm.recipe,
            "--encoder-layers", str(study.split[0]), "--decoder-layers", str(study.split[1]),
            "--corpus", str(corpus.resolve()), "--seq-len", str(study.seq_len), "--batch-size", str(study.batch_size),
            "--max-steps", str(study.steps), "--lr", str(study.lr), "--seed", str(study.seed),
            "--eval-every", str(study.eval_every), "--eval-loops", ",".join(map(str, study.eval_loops)),
            "--val-tokens", str(study.valid_examples * study.seq_len), "--save-every", str(study.save_every),
            "--keep-checkpoints", "1", "--tensorboard", "false", "--out", str(run)]
    if data:
        argv += ["--data", data]
    if run.exists():
        argv.append("--resume")  # continues from the last checkpoint, or starts over where there is none
    return argv + list(arm.flags)  # last, so that they win


def cmd_train(args: argparse.Namespace) -> None:
    study, out, arm = study_settings(args), Path(args.out), arm_named(args.arm)
    if arm.recipe is None:
        fail(f"arm {args.arm!r} is not trained (its model is scored as it is): run `score {args.arm}`")
    argv = train_argv(study, out, args.arm, arm, args.data)
    if argv is None:
        print(f"{args.arm}: trained already ({model_dir(out, args.arm)})")
        return
    print("loopus " + " ".join(argv), flush=True)
    run_loopus(argv)


# -- score -----------------------------------------------------------------------------------------

def load_model(path: str):
    """(model, tokenizer) of a checkpoint directory (LoopUS or plain) or an embedded base name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import loopus  # noqa: F401  (registers the LoopUS classes with the Auto classes)
    from loopus.zoo import load_base

    if not Path(path).is_dir():
        return load_base(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def scored_model(study: Study, out: Path, name: str, arm: Arm) -> str:
    if arm.recipe is None:
        return arm.model or study.model
    run = model_dir(out, name)
    if not (run / "metrics.json").is_file():
        fail(f"arm {name!r} has no final model in {run}: run `train {name}` first")
    return str(run)


def cmd_score(args: argparse.Namespace) -> None:
    from loopus.eval.options_score import exit_label, is_looped, parse_exit_rules, score_items

    study, out, arm = study_settings(args), Path(args.out), arm_named(args.arm)
    items = test_items(study, out, args.data, args.limit)
    if args.depths is not None:
        unknown = sorted(set(args.depths) - set(study.test_depths))
        if unknown:
            fail(f"--depths {unknown} are not test depths of the study ({list(study.test_depths)})")
        items = [item for item in items if item.depth in args.depths]
    exit_limit = args.limit if args.exit_limit is None else min(args.exit_limit, args.limit)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(scored_model(study, out, args.arm, arm))
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    looped = is_looped(model)
    loops = sorted(set(args.loops)) if looped else [1]
    rules = parse_exit_rules(args.exit_rules, max(loops)) if looped else []
    settings = {"loops": loops, "exit_rules": [exit_label(r) for r in rules], "budget": max(loops),
                "limit": args.limit, "exit_limit": exit_limit if rules else 0, "items": len(items),
                "depths": sorted({item.depth for item in items})}
    folder = out / args.arm
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "scores.partial.jsonl"
    done: dict[str, dict] = {}
    if partial.is_file():
        lines = partial.read_text().splitlines()
        if json.loads(lines[0]) != settings:
            fail(f"{partial} was scored with other settings ({lines[0]}): delete it or score with those")
        done = {r["id"]: r for r in map(json.loads, lines[1:]) if r}
    else:
        partial.write_text(json.dumps(settings) + "\n")
    rank: dict[int, int] = {}
    with_exit = set()  # the first exit_limit items of each depth
    for item in items:
        rank[item.depth] = rank.get(item.depth, 0) + 1
        if rank[item.depth] <= exit_limit:
            with_exit.add(item.id)
    todo = [item for item in items if item.id not in done]
    with partial.open("a") as f:
        for exits in (True, False):
            part = [item for item in todo if (item.id in with_exit) == exits]
            for record in score_items(model, tokenizer, part, loops, rules if exits else (),
                                      batch_size=args.items_per_batch, desc=f"score[{args.arm}]"):
                done[record["id"]] = record
                f.write(json.dumps(record) + "\n")
                f.flush()
    result = {"arm": args.arm, "model": scored_model(study, out, args.arm, arm), "looped": looped, **settings,
              "items": [done[item.id] for item in items]}
    (folder / "scores.json").write_text(json.dumps(result) + "\n")
    partial.unlink()
    print(f"{args.arm}: {len(items)} items -> {folder / 'scores.json'}")


# -- forgetting --------------------------------------------------------------------------------------

FORGETTING_TASKS = ("arc_easy", "piqa")


def best_loop_count(scores: dict, trained_depth: int) -> int:
    """The fixed loop count with the highest accuracy past the trained depth (over all depths if none is)."""
    items = [r for r in scores["items"] if r["depth"] > trained_depth] or scores["items"]
    return max(scores["loops"], key=lambda n: sum(r["fixed"][str(n)]["correct"] for r in items))


def cmd_forgetting(args: argparse.Namespace) -> None:
    """What the fine-tune cost outside its task: held-out enwiki perplexity and lm-eval's arc_easy and piqa,
    at one loop and (a LoopUS arm) at its best loop count past the trained depth. Writes OUT/ARM/forgetting.json."""
    from loopus.convert import as_looped
    from loopus.eval.harness import evaluate_hf, evaluate_loopus
    from loopus.eval.options_score import is_looped
    from loopus.eval.perplexity import held_out_documents, per_loop_perplexity

    study, out, arm = study_settings(args), Path(args.out), arm_named(args.arm)
    path = scored_model(study, out, args.arm, arm)
    model, tokenizer = load_model(path)
    loops, looped = [1], is_looped(model)
    if looped:
        scores = out / args.arm / "scores.json"
        if not scores.is_file():
            fail(f"{scores} not found: run `score {args.arm}` first (its best loop count is scored here too)")
        loops = sorted({1, best_loop_count(read_json(scores), study.trained_depth)})
    else:  # a plain model recast with the study's split: at one loop it computes exactly the plain model
        model = as_looped(model, *study.split)
    text = per_loop_perplexity(model.eval(), tokenizer, held_out_documents("enwiki", args.data), loops,
                               max_tokens=args.tokens)
    del model
    tasks = list(FORGETTING_TASKS)
    if looped:
        lm_eval = evaluate_loopus(path, tasks, num_loops=loops, limit=args.limit, data=args.data)["loops"]
    else:
        lm_eval = {1: evaluate_hf(path, tasks, limit=args.limit, data=args.data)}
    result = {"arm": args.arm, "model": path, "loops": loops, "enwiki_tokens": args.tokens, "lm_eval_limit": args.limit,
              "enwiki": {str(n): text[n] for n in loops}, "lm_eval": {str(n): v for n, v in lm_eval.items()}}
    target = out / args.arm / "forgetting.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.arm}: " + "; ".join(f"{n} loop(s): enwiki ppl {text[n]['ppl']:.3f}, "
                                      + ", ".join(f"{t} {m.get('acc', float('nan')):.3f}" for t, m in
                                                  result["lm_eval"][str(n)].items()) for n in loops))


# -- command line ----------------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> None:
    study = study_settings(args)
    written = write_report(Path(args.out), dataclasses.asdict(study), list(ARMS), REFERENCES)
    for path in written:
        print(path)


def add_shared_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    """--out, --data and the study settings; accepted before or after the sub-command (`suppress`: on a
    sub-command's parser, where an option left out must not reset what was given before it)."""
    default = argparse.SUPPRESS if suppress else None
    p.add_argument("--out", default=default,
                   help="the study's folder (OUT/study.json fixes its settings)")
    p.add_argument("--data", default=default, help="data directory (default: $LOOPUS_DATA)")
    study = p.add_argument_group("study settings (first command only; stored in OUT/study.json)")
    study.add_argument("--task", choices=sorted(TASK_DEPTHS), default=default)
    study.add_argument("--train-depths", type=lambda t: tuple(depth_range(t)), default=default)
    study.add_argument("--test-depths", type=lambda t: tuple(depth_range(t)), default=default)
    study.add_argument("--model", default=default, help="base model of every arm (default gemma-3-270m)")
    study.add_argument("--split", type=parse_ints, default=default, help="encoder,decoder layers (default 6,3)")
    for name in ("steps", "batch_size", "seq_len", "seed", "eval_every", "valid_examples", "save_every",
                 "train_size", "test_size", "distractors"):
        study.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    study.add_argument("--lr", type=float, default=default)
    study.add_argument("--operation", choices=OPERATIONS, default=default,
                       help="depthchain: add (modular sums) or copy (pointer chasing)")
    study.add_argument("--eval-loops", type=parse_ints, default=default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shared_options(p, suppress=False)
    shared = argparse.ArgumentParser(add_help=False)
    add_shared_options(shared, suppress=True)
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", parents=[shared], help="fine-tune one arm (skipped when done, resumed when partial)")
    train.add_argument("arm")
    train.set_defaults(handler=cmd_train)
    score = sub.add_parser("score", parents=[shared], help="score one arm's final model on the test items")
    score.add_argument("arm")
    score.add_argument("--limit", type=int, default=200, help="test items per depth (the first N)")
    score.add_argument("--depths", type=depth_range, default=None,
                       help="score these test depths only, e.g. 1-8 (default: every test depth of the study)")
    score.add_argument("--loops", type=parse_ints, default=[1, 2, 4, 8, 16], help="loop counts (LoopUS arms)")
    score.add_argument("--exit-rules", type=lambda t: [s for s in t.split(",") if s.strip() and s != "none"],
                       default=list(EXIT_STRATEGIES),
                       help="adaptive exit rules at the largest loop count: STRATEGY[=THRESHOLD],... or none "
                            f"(default: each at its default threshold, {DEFAULT_THRESHOLDS})")
    score.add_argument("--exit-limit", type=int, default=None,
                       help="score the exit rules on the first N items per depth only (default: all; each costs "
                            "one more forward at the largest loop count)")
    score.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    score.add_argument("--device", default="auto", help="where to score: auto (a GPU if there is one), cpu, cuda")
    score.add_argument("--items-per-batch", type=int, default=8, help="items per forward (fixed loop counts)")
    score.set_defaults(handler=cmd_score)
    forget = sub.add_parser("forgetting", parents=[shared], help="held-out enwiki perplexity and arc_easy/piqa of "
                            "one arm (at 1 loop and its best loop count), to set against base and dense")
    forget.add_argument("arm")
    forget.add_argument("--tokens", type=int, default=8192, help="held-out enwiki tokens")
    forget.add_argument("--limit", type=int, default=200, help="lm-eval items per task")
    forget.set_defaults(handler=cmd_forgetting)
    report = sub.add_parser("report", parents=[shared], help="tables and figures of every scored arm")
    report.set_defaults(handler=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is required (the study's folder)")
    try:
        args.handler(args)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
