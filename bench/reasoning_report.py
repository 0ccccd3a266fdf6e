"""The report of bench/reasoning.py: tables (markdown and JSON) and figures from every arm's scores.json.

Accuracy is a mean of 0/1 scores with its standard error (sample standard deviation / sqrt(n)). An arm
is compared with the dense arm (at its one loop) on the same items: the mean of the per-item
differences, with the standard error of those differences (the paired standard error). Depths are
grouped as in distribution (k <= K, K the deepest trained depth), extrapolation (K < k <= 2K) and
beyond (k > 2K). Under adaptive exit, the loop passes of the scored position are set against depth
(Spearman's rank correlation over items) and against the fixed budget.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from loopus.plotting import pyplot, save_figure

DENSE, BASE = "dense", "base"


def mean_se(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0, n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n), n


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (Pearson of the tie-averaged ranks); NaN where either is constant."""
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx, sy = math.sqrt(sum((a - mx) ** 2 for a in rx)), math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx > 0 and sy > 0 else math.nan


class ArmScores:
    """One arm's scores.json: outcomes per label (a fixed loop count "4", or an exit rule "kl=0.01")."""

    def __init__(self, name: str, data: dict):
        self.name = name
        self.budget = data["budget"]
        self.fixed = [str(n) for n in data["loops"]]
        self.exits = list(data["exit_rules"])
        self.items = data["items"]

    @property
    def labels(self) -> list[str]:
        return self.fixed + self.exits

    def outcome(self, label: str) -> dict[str, tuple[int, float, int | None]]:
        """{item id: (depth, 1.0 if correct else 0.0, loop passes or None)} under `label`, over the items
        scored under it (exit rules may cover the first items of each depth only)."""
        kind = "fixed" if label in self.fixed else "exit"
        return {r["id"]: (r["depth"], float(r[kind][label]["correct"]), r[kind][label].get("loop_passes"))
                for r in self.items if label in r[kind]}


def depth_groups(depths: Iterable[int], trained: int) -> dict[str, list[int]]:
    depths = sorted(set(depths))
    groups = {"in_distribution": [d for d in depths if d <= trained],
              "extrapolation": [d for d in depths if trained < d <= 2 * trained],
              "beyond": [d for d in depths if d > 2 * trained]}
    return {k: v for k, v in groups.items() if v}


def accuracy_table(arm: ArmScores, depths: list[int], groups: dict[str, list[int]]) -> dict[str, dict]:
    """{label: {depth or group: (mean, se, n)}}."""
    table = {}
    for label in arm.labels:
        outcome = arm.outcome(label).values()
        row = {str(d): mean_se([c for k, c, _ in outcome if k == d]) for d in depths}
        row.update({g: mean_se([c for k, c, _ in outcome if k in ds]) for g, ds in groups.items()})
        table[label] = row
    return table


def paired(a: dict, b: dict, depths: list[int]) -> tuple[float, float, int]:
    """Mean and paired standard error of a - b over the items both scored at `depths`."""
    common = [i for i in a if i in b and a[i][0] in depths]
    return mean_se([a[i][1] - b[i][1] for i in common])


def exit_table(arm: ArmScores) -> dict[str, dict]:
    fixed = arm.outcome(str(arm.budget)) if str(arm.budget) in arm.fixed else None
    table = {}
    for rule in arm.exits:
        outcome = arm.outcome(rule)
        passes = [p for _, _, p in outcome.values()]
        depth = [d for d, _, _ in outcome.values()]
        mean_passes = sum(passes) / len(passes)
        entry = {"accuracy": mean_se([c for _, c, _ in outcome.values()]), "mean_passes": mean_passes,
                 "spearman_passes_depth": spearman(passes, depth), "passes_saved": 1 - mean_passes / arm.budget,
                 "passes_by_depth": {str(d): sum(p for k, _, p in outcome.values() if k == d) / depth.count(d)
                                     for d in sorted(set(depth))}}
        if fixed is not None:
            entry["vs_fixed_budget"] = paired(outcome, fixed, sorted(set(depth)))
        table[rule] = entry
    return table


def summary(arms: dict[str, "ArmScores"], result: dict, groups: dict[str, list[int]]) -> dict[str, dict]:
    """Per arm: its best fixed loop count on the deepest group past training (extrapolation where there is
    one), accuracy there and in distribution, the paired gap to dense there, and what the largest loop
    count loses against the best."""
    target = "extrapolation" if "extrapolation" in groups else list(groups)[-1]
    out = {}
    for name, arm in arms.items():
        table = result["accuracy"][name]
        best = max(arm.fixed, key=lambda label: table[label][target][0])
        entry = {"group": target, "best_loops": best, "at_best": table[best][target],
                 "in_distribution_at_best": table[best].get("in_distribution"),
                 "largest_minus_best": table[arm.fixed[-1]][target][0] - table[best][target][0]}
        if name in result["paired_vs_dense"]:
            entry["vs_dense_at_best"] = result["paired_vs_dense"][name][best][target]
        out[name] = entry
    return out


def learning_curve(run: Path) -> dict[str, list[tuple[int, float, float]]]:
    """{loop count: [(step, validation loss, token accuracy)]} from a run's logs/train.jsonl (last record of a
    step wins, so a restarted run's repeats count once)."""
    log = run / "logs" / "train.jsonl"
    if not log.is_file():
        return {}
    by_step: dict[int, dict] = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "validation":
            by_step[record["step"]] = record["valid"]
    curves: dict[str, list] = {}
    for step in sorted(by_step):
        for n, m in by_step[step].items():
            curves.setdefault(n, []).append((step, m["loss"], m["acc"]))
    return curves


# -- markdown ----------------------------------------------------------------------------------------

def cell(stat: tuple[float, float, int], scale: float = 100.0) -> str:
    mean, se, n = stat
    return "–" if n == 0 else f"{scale * mean:.1f} ± {scale * se:.1f}"


def markdown(study: dict, arms: dict[str, ArmScores], result: dict, depths: list[int],
             groups: dict[str, list[int]]) -> str:
    lines = [f"# Reasoning study: {study['task']}", "",
             f"Trained on depths {study['train_depths']} (K = {max(study['train_depths'])}), "
             f"{study['steps']} steps x {study['batch_size']} examples, lr {study['lr']}, seed {study['seed']}, "
             f"split {study['split']}. Accuracy in %, ± standard error.", ""]
    lines += ["## Summary: each arm at its best loop count past the trained depth", "",
              "| arm | best loops | group | accuracy there | in distribution | vs dense (paired, points) | "
              "largest loop count minus best |", "|---" * 7 + "|"]
    for name, e in result["summary"].items():
        versus = cell(e["vs_dense_at_best"]) if "vs_dense_at_best" in e else "–"
        within = cell(e["in_distribution_at_best"]) if e["in_distribution_at_best"] else "–"
        lines.append(f"| {name} | {e['best_loops']} | {e['group']} | {cell(e['at_best'])} | {within} | {versus} | "
                     f"{100 * e['largest_minus_best']:.1f} |")
    lines.append("")
    for name, arm in arms.items():
        table = result["accuracy"][name]
        lines += [f"## {name}", "", "| loops | " + " | ".join(f"k={d}" for d in depths) + " | "
                  + " | ".join(groups) + " |", "|---" * (1 + len(depths) + len(groups)) + "|"]
        for label in arm.labels:
            row = table[label]
            lines.append(f"| {label} | " + " | ".join(cell(row[str(d)]) for d in depths) + " | "
                         + " | ".join(cell(row[g]) for g in groups) + " |")
        lines.append("")
    if result["paired_vs_dense"]:
        lines += ["## Paired difference against dense (points, ± paired standard error, same items)", "",
                  "| arm | loops | " + " | ".join(groups) + " |", "|---" * (2 + len(groups)) + "|"]
        for name, per_label in result["paired_vs_dense"].items():
            for label, stats in per_label.items():
                lines.append(f"| {name} | {label} | " + " | ".join(cell(stats[g]) for g in groups) + " |")
        lines.append("")
    exits = {n: t for n, t in result["exit"].items() if t}
    if exits:
        lines += ["## Adaptive exit (passes of the scored position; budget = the largest loop count)", "",
                  "| arm | rule | accuracy | vs fixed budget (points) | mean passes | passes saved | "
                  "Spearman(passes, depth) |", "|---" * 7 + "|"]
        for name, table in exits.items():
            for rule, e in table.items():
                versus = cell(e["vs_fixed_budget"]) if "vs_fixed_budget" in e else "–"
                lines.append(f"| {name} | {rule} | {cell(e['accuracy'])} | {versus} | {e['mean_passes']:.2f} | "
                             f"{100 * e['passes_saved']:.0f}% | {e['spearman_passes_depth']:.2f} |")
        lines.append("")
    if result["forgetting"]:
        tasks = sorted({t for f in result["forgetting"].values() for m in f["lm_eval"].values() for t in m})
        lines += ["## Forgetting: held-out enwiki and general tasks after the fine-tune", "",
                  "| arm | loops | enwiki perplexity | " + " | ".join(f"{t} acc" for t in tasks) + " |",
                  "|---" * (3 + len(tasks)) + "|"]
        for name, f in result["forgetting"].items():
            for n in f["loops"]:
                scores = f["lm_eval"][str(n)]
                accs = [scores.get(t, {}) for t in tasks]
                lines.append(f"| {name} | {n} | {f['enwiki'][str(n)]['ppl']:.3f} | " + " | ".join(
                    f"{100 * a['acc']:.1f} ± {100 * a.get('acc_stderr', math.nan):.1f}" if "acc" in a else "–"
                    for a in accs) + " |")
        lines.append("")
    curves = {n: c for n, c in result["learning_curves"].items() if c}
    if curves:
        lines += ["## Validation at the end of training (answer tokens)", "", "| arm | loops | step | loss | "
                  "token accuracy |", "|---" * 5 + "|"]
        for name, per_loop in curves.items():
            for n, points in per_loop.items():
                step, loss, acc = points[-1]
                lines.append(f"| {name} | {n} | {step} | {loss:.4f} | {100 * acc:.1f} |")
        lines.append("")
    return "\n".join(lines)


# -- figures -----------------------------------------------------------------------------------------

def reference_lines(ax, result: dict, key) -> None:
    """Dense and base at their one loop, as horizontal lines (`key` picks the value from an accuracy row)."""
    for name, style in ((DENSE, dict(color="black", ls="--")), (BASE, dict(color="grey", ls=":"))):
        row = result["accuracy"].get(name, {}).get("1")
        if row is not None:
            value = key(row)
            if isinstance(value, list):
                ax.plot(*value, label=f"{name} (1 loop)", lw=1.5, **style)
            elif not math.isnan(value):
                ax.axhline(value, label=f"{name} (1 loop)", lw=1.5, **style)


def plot_accuracy_vs_depth(out: Path, arms: dict[str, ArmScores], result: dict, depths: list[int],
                           trained: int) -> Path:
    plt = pyplot()
    shown = [n for n in arms if n not in (DENSE, BASE)] or list(arms)
    fig, axes = plt.subplots(1, len(shown), figsize=(4.6 * len(shown), 3.8), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes[0], shown):
        fixed = arms[name].fixed
        for i, label in enumerate(fixed):
            row = result["accuracy"][name][label]
            ax.plot(depths, [100 * row[str(d)][0] for d in depths], marker="o", ms=3,
                    color=cmap(i / max(len(fixed) - 1, 1)), label=f"{label} loop{'s' if label != '1' else ''}")
        reference_lines(ax, result, lambda row: [depths, [100 * row[str(d)][0] for d in depths]])
        ax.axvline(trained + 0.5, color="red", lw=0.8, alpha=0.5)
        ax.set(title=name, xlabel="depth (steps the answer needs)", xticks=depths)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    return save_figure(fig, out / "accuracy_vs_depth.png")


def plot_scaling(out: Path, arms: dict[str, ArmScores], result: dict, group: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, arm in arms.items():
        if name in (DENSE, BASE) or len(arm.fixed) < 2:
            continue
        stats = [result["accuracy"][name][label][group] for label in arm.fixed]
        ax.errorbar([int(n) for n in arm.fixed], [100 * s[0] for s in stats], yerr=[100 * s[1] for s in stats],
                    marker="o", capsize=3, label=name)
    reference_lines(ax, result, lambda row: 100 * row[group][0])
    ax.set_xscale("log", base=2)
    ax.set(xlabel="loops at test time", ylabel=f"accuracy (%), {group.replace('_', ' ')}",
           title="test-time scaling beyond the trained depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out / "scaling.png")


def plot_exit_passes(out: Path, result: dict) -> Path | None:
    rules = sorted({rule for table in result["exit"].values() for rule in table})
    if not rules:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(rules), figsize=(4.2 * len(rules), 3.6), squeeze=False)
    for ax, rule in zip(axes[0], rules):
        for name, table in result["exit"].items():
            if rule in table:
                by_depth = table[rule]["passes_by_depth"]
                ax.plot([int(d) for d in by_depth], list(by_depth.values()), marker="o", ms=3, label=name)
        ax.set(title=rule, xlabel="depth", ylabel="mean loop passes")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    return save_figure(fig, out / "exit_passes.png")


def plot_learning_curves(out: Path, curves: dict[str, dict]) -> Path | None:
    curves = {n: c for n, c in curves.items() if c}
    if not curves:
        return None
    plt = pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, per_loop) in enumerate(curves.items()):
        color = f"C{i}"
        for n, points in per_loop.items():
            style = "-" if n == "1" else "--"
            steps = [p[0] for p in points]
            loss_ax.plot(steps, [p[1] for p in points], style, color=color, label=f"{name}, {n} loop(s)")
            acc_ax.plot(steps, [100 * p[2] for p in points], style, color=color, label=f"{name}, {n} loop(s)")
    loss_ax.set(xlabel="optimiser step", ylabel="validation loss (answer tokens)")
    acc_ax.set(xlabel="optimiser step", ylabel="validation token accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7)
    return save_figure(fig, out / "learning_curves.png")


def write_report(out: Path, study: dict, arm_order: list[str], references: tuple[str, ...]) -> list[Path]:
    """report.md, report.json and the figures under `out`, from each arm's scores.json; returns the files."""
    found = [p.parent.name for p in sorted(out.glob("*/scores.json"))]
    names = [n for n in arm_order if n in found] + [n for n in found if n not in arm_order]
    if not names:
        raise FileNotFoundError(f"no OUT/ARM/scores.json under {out}: score an arm first")
    arms = {n: ArmScores(n, json.loads((out / n / "scores.json").read_text())) for n in names}
    trained = max(study["train_depths"])
    depths = sorted({r["depth"] for arm in arms.values() for r in arm.items})
    groups = depth_groups(depths, trained)
    result: dict[str, Any] = {"study": study, "groups": groups, "references": list(references),
                              "accuracy": {n: accuracy_table(a, depths, groups) for n, a in arms.items()},
                              "paired_vs_dense": {}, "exit": {n: exit_table(a) for n, a in arms.items()},
                              "learning_curves": {n: learning_curve(out / n / "model") for n in names},
                              "forgetting": {p.parent.name: json.loads(p.read_text())
                                             for p in sorted(out.glob("*/forgetting.json"))}}
    if DENSE in arms:
        dense = arms[DENSE].outcome("1")
        for name, arm in arms.items():
            if name != DENSE:
                result["paired_vs_dense"][name] = {label: {g: paired(arm.outcome(label), dense, ds)
                                                           for g, ds in groups.items()} for label in arm.labels}
    result["summary"] = summary(arms, result, groups)
    scaling_group = "extrapolation" if "extrapolation" in groups else next(iter(groups))
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "report.md").write_text(markdown(study, arms, result, depths, groups) + "\n")
    figures = [plot_accuracy_vs_depth(out, arms, result, depths, trained), plot_scaling(out, arms, result, scaling_group),
               plot_exit_passes(out, result), plot_learning_curves(out, result["learning_curves"])]
    return [out / "report.md", out / "report.json", *(f for f in figures if f is not None)]
