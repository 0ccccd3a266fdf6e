"""Running lm-eval from Python: one model, a task list, a sweep over num_loops and exit thresholds.

`loopus eval` and `loopus run` call these; they use lm-eval's `simple_evaluate` with the shipped
offline tasks, and keep one loaded model across the sweep.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable

from ..config import check_num_loops
from ..deprecation import renamed_keyword
from .report import (
    markdown_table,
    metric_rows,
    plot_compute_vs_quality,
    plot_metric_vs_loops,
    requested_results,
    write_json,
)


def _task_manager(tasks: list[str], data: str | Path | None = None):
    """The shipped offline tasks only (fast: no scan of lm-eval's thousands of YAMLs) when they cover `tasks`.

    `data`: the data directory the offline tasks read, handed to their loaders as lm-eval task metadata
    (None: they read `$LOOPUS_DATA`). Refuses task names it does not know (lm-eval would raise a KeyError
    once the model is loaded).
    """
    from . import SHIPPED_TASKS, task_manager

    shipped = all(t in SHIPPED_TASKS or t.startswith("mmlu_") for t in tasks)
    metadata = {"data_dir": str(data)} if data is not None else None
    tm = task_manager(include_defaults=not shipped, metadata=metadata)
    unknown = [t for t in tasks if t not in tm.all_tasks and not Path(t).is_file()]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}: the offline tasks shipped with loopus are "
                         f"{', '.join(SHIPPED_TASKS)}; `loopus lm-eval ls tasks` lists lm-eval's own")
    return tm


def _simple_evaluate(lm, tasks: list[str], limit: float | None, tm, **kwargs) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for `tasks` and the members of the groups among them, standard errors included."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=tm, **kwargs)
    return requested_results(results, tasks)


def evaluate_hf(
    model: str, tasks: list[str], limit: float | None = None, batch_size: int = 8, device: str | None = None,
    data: str | Path | None = None, **kwargs
) -> dict[str, dict[str, float]]:
    """lm-eval's own `hf` model on a base checkpoint (an embedded name, a directory or a hub id)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from ..zoo import resolve

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tm = _task_manager(tasks, data)
    lm = HFLM(pretrained=resolve(model), dtype="float32", batch_size=batch_size, device=device)
    return _simple_evaluate(lm, tasks, limit, tm, **kwargs)


def evaluate_loopus(
    model: str,
    tasks: list[str],
    num_loops: Iterable[int] | None = None,
    limit: float | None = None,
    exit_strategy: str | None = None,
    thresholds: Iterable[float] = (),
    min_loops: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    data: str | Path | None = None,
    *,
    loops: Iterable[int] | None = None,
    exit_loops: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """A LoopUS checkpoint at each fixed `num_loops` count (default 1, 2, 4, 8) and, with `exit_strategy`, at each exit threshold.

    Returns {"loops": {n: {task: {metric: v}}}, "points": [compute-vs-quality points]}.
    Exit thresholds run at a budget of the largest of `num_loops`; an exit strategy without thresholds runs
    at the strategy's default threshold. `data`: the offline tasks' data directory (default `$LOOPUS_DATA`).
    `loops` (now `num_loops`) and `exit_loops` (the exit budget) are deprecated.
    """
    import torch

    from ..halting import DEFAULT_THRESHOLDS, ExitRule
    from .lm_eval_model import LoopUSLM

    num_loops = renamed_keyword("evaluate_loopus", "loops", "num_loops", loops, num_loops) or (1, 2, 4, 8)
    num_loops = sorted(set(check_num_loops(n) for n in num_loops))
    if exit_loops is not None:
        warnings.warn("evaluate_loopus(exit_loops=...) is deprecated and will be removed: exit thresholds run at "
                      "the largest of num_loops", DeprecationWarning, stacklevel=2)
    budget = exit_loops or num_loops[-1]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    thresholds = [float(t) for t in thresholds]
    if thresholds and not exit_strategy:
        raise ValueError("exit thresholds need an exit strategy (--exit-strategy)")
    if exit_strategy and not thresholds:
        ExitRule.build(exit_strategy, None, min_loops, budget)  # an unknown strategy is named before any work
        thresholds = [DEFAULT_THRESHOLDS[exit_strategy]]
    exit_args = {"exit_strategy": exit_strategy, "exit_threshold": thresholds[0] if thresholds else None,
                 "min_loops": min_loops}
    tm = _task_manager(tasks, data)  # unknown task names are refused before the model loads
    # Fail before any evaluation if the model can't do what was asked (the check lives in LoopUSLM).
    lm = LoopUSLM(pretrained=str(model), num_loops=num_loops[0], batch_size=batch_size, device=device, **exit_args)
    out: dict[str, Any] = {"loops": {}, "points": []}
    for n in num_loops:
        lm.reset(n)
        metrics = _simple_evaluate(lm, tasks, limit, tm, **kwargs)
        out["loops"][n] = metrics
        out["points"].append({"label": f"fixed {n}", "mean_loop_passes": lm.mean_loop_passes or n, "metrics": metrics})
    for t in thresholds:
        lm.reset(budget, **{**exit_args, "exit_threshold": t})
        metrics = _simple_evaluate(lm, tasks, limit, tm, **kwargs)
        out["points"].append(
            {"label": f"t={t:g}", "threshold": t, "mean_loop_passes": lm.mean_loop_passes, "metrics": metrics}
        )
    return out


def write_eval_report(out_dir: str | Path, report: dict[str, Any], title: str = "") -> dict[str, Path]:
    """report.json, report.md and the PNGs for an `evaluate_loopus` result (plus optional extras: `settings`,
    `notes`, and `references`, other models' {label: {task: {metric: value}}} drawn as lines in the plots)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": write_json(report, out / "report.json")}
    md = [f"# {title or 'LoopUS evaluation'}\n"]
    if report.get("settings"):
        md.append("Settings: " + ", ".join(f"`{k}={v}`" for k, v in report["settings"].items()) + "\n")
    loops = report.get("loops") or {}
    if loops:
        md.append("## Metric against num_loops\n")
        md.append(markdown_table(metric_rows({f"loops={n}": m for n, m in loops.items()})))
        files["metric_vs_loops"] = plot_metric_vs_loops(
            {int(n): m for n, m in loops.items()}, out / "metric_vs_loops.png", title, report.get("references")
        )
    points = report.get("points") or []
    if points:
        md.append("\n## Compute against quality\n")
        rows = []
        for p in points:
            for task, metrics in p["metrics"].items():
                for metric, value in metrics.items():
                    rows.append({"setting": p["label"], "mean loop passes/token": p["mean_loop_passes"], "task": task, "metric": metric, "value": value})
        md.append(markdown_table(rows))
        files["compute_vs_quality"] = plot_compute_vs_quality(points, out / "compute_vs_quality.png", title,
                                                              report.get("references"))
    for note in report.get("notes", []):
        md.append(f"\n- {note}")
    (out / "report.md").write_text("\n".join(md) + "\n")
    files["markdown"] = out / "report.md"
    return files
