"""Run logs as Accelerate trackers: `logs/train.jsonl` always, TensorBoard in `logs/tb`, and any tracker
Accelerate knows (W&B, MLflow, Aim, ...) named in `LogConfig.log_with`. `LogConfig` also holds how
often the run logs, validates and writes checkpoints.

A record is one event of the run (`{"step": 3, "lm": 2.1, ...}`, `{"event": "validation", "valid":
{"2": {"loss": ...}}}`). The JSONL log keeps it whole; the metric trackers get its numbers under
`/`-joined keys (`valid/2/loss`), which is what TensorBoard, MLflow and Aim accept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, TensorBoardTracker, get_available_trackers
from accelerate.utils import is_tensorboard_available

from .options import Section, option, parse_ints, parse_strings

PROJECT = "loopus"  # the project trackers such as W&B file the run under


@dataclass(frozen=True)
class LogConfig(Section):
    """Logging, validation and checkpoints: when and where, not what is trained."""

    log_every: int = option(1, "log every N optimiser steps")
    eval_every: int = option(0, "validate every N steps (0: before and after only)")
    eval_loops: tuple[int, ...] = option((1, 2, 4, 8), "loop counts to validate at, e.g. 1,2,4,8", parse=parse_ints)
    eval_batch_size: int = option(4, "validation batch size")
    eval_at_start: bool = option(True, "validate before training")
    eval_at_end: bool = option(True, "validate after training")
    save_every: int = option(0, "checkpoint every N optimiser steps (0: final model only)")
    keep_checkpoints: int = option(2, "checkpoints kept")
    progress: bool = option(True, "progress bar")
    tensorboard: bool = option(True, "TensorBoard logs in OUT/logs/tb")
    log_with: tuple[str, ...] = option((), "comma list of more Accelerate trackers (wandb, mlflow, aim, comet_ml, "
                                       "...); TensorBoard is --tensorboard", parse=parse_strings)

    def check(self) -> None:
        if "tensorboard" in self.log_with:
            raise ValueError("TensorBoard is the `tensorboard` option (on by default): leave it out of log_with")
        if any(n < 1 for n in self.eval_loops):
            raise ValueError(f"eval loop counts must be >= 1, got {list(self.eval_loops)}")


class JSONLTracker(GeneralTracker):
    """Appends each record to a JSON-lines file, nested values and strings as they are.

    Accelerate hands every tracker the same values, so `log_record` passes the whole record to this
    one as a keyword (`log_kwargs`) next to the flattened numbers all of them get.
    """

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    @property
    def tracker(self) -> Path:
        return self.path

    def log(self, values: dict[str, Any], step: int | None = None, record: dict[str, Any] | None = None,
            **kwargs: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(values if record is None else record) + "\n")


def build_trackers(cfg: LogConfig, out: Path) -> list[GeneralTracker | str]:
    """`Accelerator(log_with=...)` for a run writing into `out`: TensorBoard only where it is installed,
    and a tracker named in `cfg.log_with` must be (Accelerate would leave it out without a word)."""
    missing = sorted(set(cfg.log_with) - {str(tracker) for tracker in get_available_trackers()})
    if missing:
        raise ValueError(f"log_with names trackers that are unknown or not installed: {missing}")
    logs = out / "logs"
    trackers: list[GeneralTracker | str] = [JSONLTracker(logs / "train.jsonl")]
    if cfg.tensorboard and is_tensorboard_available():
        trackers.append(TensorBoardTracker("tb", logs))
    return trackers + list(cfg.log_with)


def drop_records_after(logs: Path, step: int) -> None:
    """Forget the records of `logs/train.jsonl` after `step`: a resumed run logs those steps again."""
    path = logs / "train.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) < len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, int | float]:
    """The numbers of a record, nested keys joined with `/`, without the top-level `step`."""
    out: dict[str, int | float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and name != "step":
            out[name] = value
    return out


def log_record(accelerator: Accelerator, record: dict[str, Any], step: int) -> None:
    """Log `record` at `step` to every tracker, starting them on first use (main process only)."""
    if not accelerator.is_main_process:
        return
    if not accelerator.trackers:
        accelerator.init_trackers(PROJECT)
    accelerator.log(scalars(record), step=step, log_kwargs={JSONLTracker.name: {"record": record}})
