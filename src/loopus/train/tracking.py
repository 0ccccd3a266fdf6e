"""Run logs as Accelerate trackers: `logs/train.jsonl` always, TensorBoard in `logs/tb`, and any tracker
Accelerate knows (W&B, MLflow, Aim, ...) named in `TrainConfig.log_with`.

A record is one event of the run (`{"step": 3, "lm": 2.1, ...}`, `{"event": "validation", "valid":
{"2": {"loss": ...}}}`). The JSONL log keeps it whole; the metric trackers get its numbers under
`/`-joined keys (`valid/2/loss`), which is what TensorBoard, MLflow and Aim accept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, TensorBoardTracker, get_available_trackers
from accelerate.utils import is_tensorboard_available

from .config import TrainConfig

PROJECT = "loopus"  # the project trackers such as W&B file the run under


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


def build_trackers(cfg: TrainConfig, out: Path) -> list[GeneralTracker | str]:
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
