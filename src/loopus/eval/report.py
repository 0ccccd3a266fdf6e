"""Evaluation reports: lm-eval results flattened to {task: {metric: value}}, JSON, markdown tables and
the two plots (each metric against num_loops; mean loop passes per token against quality for exit
thresholds)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..plotting import pyplot, save_figure

# Metrics where lower is better (for labels and for picking plot directions).
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")

References = Mapping[str, Mapping[str, Mapping[str, float]]]  # {model label: {task: {metric: value}}}


def stderr_name(metric: str) -> str:
    """The flattened name of `metric`'s standard error: acc -> acc_stderr, m[filter] -> m_stderr[filter]."""
    base, bracket, filt = metric.partition("[")
    return f"{base}_stderr{bracket}{filt}"


def flatten_results(results: Mapping[str, Any], stderr: bool = False) -> dict[str, dict[str, float]]:
    """`simple_evaluate(...)` output -> {task: {metric: value}}, a filter kept as `metric[filter]`.

    Standard errors are dropped, or with `stderr` kept as metrics of their own (`acc_stderr`); one that
    lm-eval could not compute ("N/A", e.g. for one document) is left out.
    """
    flat: dict[str, dict[str, float]] = {}
    for task, metrics in (results.get("results") or {}).items():
        row = {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len", "samples") or not isinstance(value, (int, float)):
                continue
            if "_stderr" in key and not stderr:
                continue
            metric, _, filt = key.partition(",")
            if filt not in ("", "none"):
                metric = f"{metric}[{filt}]"
            row[metric] = float(value)
        if row:
            flat[task] = row
    return flat


def requested_results(results: Mapping[str, Any], tasks: Iterable[str]) -> dict[str, dict[str, float]]:
    """The report rows for `tasks`, with standard errors: each task, and after a group each of its members
    (so a laddered group gives its accuracy per depth next to the pooled one)."""
    flat = flatten_results(results, stderr=True)
    members = results.get("group_subtasks") or {}
    rows: dict[str, dict[str, float]] = {}

    def add(name: str) -> None:
        if name in flat and name not in rows:
            rows[name] = flat[name]
        for member in members.get(name, ()):
            add(member)

    for task in tasks:
        add(task)
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return "" if value is None else str(value)


def markdown_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    """A GitHub markdown table of `rows` (dicts); columns default to the keys in first-seen order."""
    if not rows:
        return ""
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def metric_rows(by_model: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[dict[str, Any]]:
    """{model: {task: {metric: v}}} -> one row per (task, metric), one column per model."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for model, tasks in by_model.items():
        for task, metrics in tasks.items():
            for metric, value in metrics.items():
                row = rows.setdefault((task, metric), {"task": task, "metric": metric})
                row[model] = value
    return list(rows.values())


def _series(points: Iterable[tuple[Any, Mapping[str, Mapping[str, float]]]]) -> dict[str, list[tuple[Any, float]]]:
    """(x, {task: {metric: value}}) points -> {"task metric": [(x, value), ...]}: one series per panel
    (standard errors are error bars on their metric's panel, not panels of their own)."""
    series: dict[str, list[tuple[Any, float]]] = {}
    for x, tasks in points:
        for task, metrics in tasks.items():
            for metric, value in metrics.items():
                if "_stderr" in metric:
                    continue
                series.setdefault(f"{task} {metric}", []).append((x, value))
    return series


def _panels(count: int):
    """A grid of up to three panels per row, one per (task, metric) series."""
    cols = min(3, max(1, count))
    rows = max(1, math.ceil(count / cols))
    return pyplot().subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)


def _save_panels(fig, axes, used: int, title: str, path: str | Path) -> Path:
    """Blank the unused panels, title, save as PNG and free the figure."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _draw_references(ax, references: References | None, name: str) -> None:
    """Each reference model's value on the panel's (task, metric) as a labelled horizontal line, so a
    reader sees at a glance whether a point of the looped curve beats it; a legend once there is one."""
    task, metric = name.split(" ", 1)
    for i, (label, tasks) in enumerate((references or {}).items()):
        value = tasks.get(task, {}).get(metric)
        if value is not None:
            ax.axhline(value, color=f"C{i + 1}", linestyle=("--", ":", "-.")[i % 3], linewidth=1.2, label=label)
    if len(ax.get_legend_handles_labels()[1]) > 1:
        ax.legend(fontsize=7)


def plot_metric_vs_loops(curve: Mapping[int, Mapping[str, Mapping[str, float]]], path: str | Path, title: str = "",
                         references: References | None = None) -> Path:
    """Test-time scaling: one panel per (task, metric), the metric against num_loops.

    `curve` is {num_loops: {task: {metric: value}}}; `references` ({label: {task: {metric: value}}}, e.g.
    the base model and the dense baseline) are drawn as horizontal lines beside it.
    """
    series = _series((n, curve[n]) for n in sorted(int(n) for n in curve))
    names = sorted(series)
    fig, axes = _panels(len(names))
    for ax, name in zip(axes.flat, names):
        xs, ys = zip(*series[name])
        task, metric = name.split(" ", 1)
        errs = [curve[n][task].get(stderr_name(metric)) for n in xs]
        ax.errorbar(xs, ys, yerr=None if None in errs else errs, marker="o", capsize=3, label="LoopUS")
        _draw_references(ax, references, name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("num_loops")
        ax.set_title(name, fontsize=9)
        if name.split()[-1] in LOWER_IS_BETTER:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    return _save_panels(fig, axes, len(names), title, path)


def plot_compute_vs_quality(points: Iterable[Mapping[str, Any]], path: str | Path, title: str = "",
                            references: References | None = None) -> Path:
    """Compute against quality for exit thresholds: x = mean loop passes per token, y = each metric.

    `points`: dicts with `mean_loop_passes`, `label` (e.g. "t=0.9" or "fixed 4") and `metrics`
    ({task: {metric: value}}); `references` as in `plot_metric_vs_loops`.
    """
    series = _series(((float(p["mean_loop_passes"]), str(p.get("label", ""))), p["metrics"]) for p in points)
    names = sorted(series)
    fig, axes = _panels(len(names))
    for ax, name in zip(axes.flat, names):
        pts = sorted((x, y, label) for (x, label), y in series[name])
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label="LoopUS")
        _draw_references(ax, references, name)
        for x, y, label in pts:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("mean loop passes / token")
        ax.set_title(name, fontsize=9)
        ax.grid(True, alpha=0.3)
    return _save_panels(fig, axes, len(names), title, path)


def write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(obj, indent=2, default=str))
    return path
