"""`TrainConfig`: every choice a training run makes, composed of the sub-configs of the modules that read them.

    build    `model.BuildConfig`      the model, its split, what of it trains, adapters
    dataset  `data.DataConfig`        corpora, packing, batch shape, seed
    rds      `objective.RDSConfig`    plan sampling and loss weights
    optim    `optim.OptimConfig`      AdamW and its schedule
    logging  `tracking.LogConfig`     logs, validation, checkpoints

beside the run's own options: where it writes, its length, and how it computes (precision, FSDP,
activation checkpointing, threads). A resumed run must agree with its checkpoint on `build`, `dataset`
and `rds` as wholes (and on the processes and sharding it ran with).

The config is frozen. `resolve(cfg, runtime)` is the one step that fills what depends on where the
run happens (precision on the device, FSDP also from Accelerate's own setting, depth adapters where
the run can use them) and returns a resolved copy; that copy is what the trainer uses, logs and saves.
Options can be given flat (`{"lr": 1e-5}`, the CLI flags' names) or nested (`{"optim": {"lr": 1e-5}}`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import DataConfig
from .model import BuildConfig
from .objective import ONE_LOOP, RDSConfig
from .optim import OptimConfig
from .options import Section, option, parse_bool
from .recipes import DEFAULT, recipe
from .tracking import LogConfig

SECTIONS: dict[str, type[Section]] = {"build": BuildConfig, "dataset": DataConfig, "rds": RDSConfig,
                                      "optim": OptimConfig, "logging": LogConfig}
PRECISIONS = ("auto", "fp32", "bf16")
# sub-configs a resumed run must share with its checkpoint: they decide the model, the rows and the plans
RESUMED_AS_WHOLES = ("build", "dataset", "rds")
# an option a saved config lacks predates it: the run then had the option's old behaviour
ABSENT_MEANS = {"depth_lora_rank": 0}


class ConfigFileError(ValueError):
    """A --config file that cannot be read as a mapping of options."""


@dataclass(frozen=True)
class Runtime:
    """Facts about where a run happens, which some options depend on."""

    processes: int = 1
    fsdp: bool = False        # Accelerate runs this job sharded (`accelerate launch --use_fsdp`)
    device: str = "cpu"

    @classmethod
    def detect(cls) -> "Runtime":
        """From the environment, as Accelerate reads it (before an `Accelerator` exists)."""
        import torch

        return cls(int(os.environ.get("WORLD_SIZE", "1")),
                   os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true",
                   "cuda" if torch.cuda.is_available() else "cpu")

    @classmethod
    def of(cls, accelerator) -> "Runtime":
        from accelerate.utils import DistributedType

        return cls(accelerator.num_processes, accelerator.distributed_type == DistributedType.FSDP,
                   accelerator.device.type)


@dataclass(frozen=True)
class TrainConfig:
    """A training run: the sub-configs and the run's own options (see the module docstring)."""

    build: BuildConfig = field(default_factory=BuildConfig)
    dataset: DataConfig = field(default_factory=DataConfig)
    rds: RDSConfig = field(default_factory=RDSConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LogConfig = field(default_factory=LogConfig)
    out: str = option("runs/train", "output directory: the trained model (save_pretrained), logs/, checkpoints/")
    resume: bool = option(False, "continue exactly from the latest checkpoint in --out")
    max_steps: int | None = option(None, "optimiser steps (or --max-tokens)", parse=int)
    max_tokens: int | None = option(None, "training tokens, rounded up to whole optimiser steps (or --max-steps)",
                                    parse=int)
    precision: str = option("auto", "auto: bf16 autocast on GPU, fp32 on CPU", choices=PRECISIONS)
    fsdp: bool = option(False, "shard weights, gradients and optimiser state across processes with FSDP2; on by "
                        "itself under `accelerate launch --use_fsdp`", parse=parse_bool)
    gradient_checkpointing: bool = option(False, "recompute decoder layers in the backward")
    threads: int = option(0, "torch CPU threads (0: torch's default)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse combinations that are wrong wherever the run happens (`resolve` checks the rest)."""
        b = self.build
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("give the length of the run: --max-steps N or --max-tokens N")
        if self.max_steps is not None and self.max_tokens is not None:
            raise ValueError(f"give one length of the run, not both: --max-steps {self.max_steps} or --max-tokens "
                             f"{self.max_tokens}")
        for name in ("max_steps", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if b.depth_lora_rank and not b.looped:
            raise ValueError("depth-wise adapters act from loop 2 on: they need --mode loopus")
        if b.depth_lora_rank and b.lora_rank > 0:
            raise ValueError("choose one kind of adapter: --lora-rank (every loop) or --depth-lora-rank "
                             "(loop 2 on), not both")
        if self.rds.kl_base > 0 and not b.looped:
            raise ValueError("--kl-base is a loop-1 term: it needs --mode loopus and --supervise-first true")

    def tokens_per_step(self, num_processes: int = 1) -> int:
        return self.dataset.tokens_per_step(num_processes)

    def total_steps(self, num_processes: int = 1) -> int:
        if self.max_steps is not None:
            return int(self.max_steps)
        return max(1, -(-int(self.max_tokens) // self.tokens_per_step(num_processes)))

    def to_dict(self) -> dict[str, Any]:
        """Nested, as written to train_config.json and checkpoints."""
        out: dict[str, Any] = {name: getattr(self, name).to_dict() for name in SECTIONS}
        out.update({f.name: getattr(self, f.name) for f in top_fields()})
        return out

    def flat(self) -> dict[str, Any]:
        """Every option under its flag's name."""
        nested = self.to_dict()
        return {k: v for name in SECTIONS for k, v in nested.pop(name).items()} | nested

    @classmethod
    def of(cls, **options: Any) -> "TrainConfig":
        """From flat options (the flags' names) or sections; see `from_dict`."""
        return cls.from_dict(options)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """From flat or nested options; `recipe: NAME` starts from that recipe, which the other options override."""
        values = dict(values)
        flat = recipe(values.pop("recipe")) if "recipe" in values else {}
        for key, value in values.items():
            if key in SECTIONS and isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        owners = option_owners()
        unknown = sorted(set(flat) - set(owners))
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {', '.join(sorted(owners))}")
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        top: dict[str, Any] = {}
        for key, value in flat.items():
            (sections[owners[key]] if owners[key] else top)[key] = value
        return cls(**{name: SECTIONS[name](**sections[name]) for name in SECTIONS}, **top)

    @classmethod
    def saved(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config as a checkpoint or train_config.json holds it (nested, or flat from earlier releases)."""
        flat = {k: v for name in SECTIONS for k, v in values.get(name, {}).items()} if "build" in values else values
        flat = {**ABSENT_MEANS, **{k: v for k, v in values.items() if k not in SECTIONS}, **flat}
        return cls.from_dict({k: v for k, v in flat.items() if k in option_owners()})

    @staticmethod
    def read_file(path: str | Path) -> dict[str, Any]:
        """Options from a YAML or JSON file (flat or nested as in `from_dict`; dashes allowed in names)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        import yaml

        text = path.read_text()
        try:
            values = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
        except (ValueError, yaml.YAMLError) as err:
            kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "JSON"
            detail = " ".join(str(err).split())
            raise ConfigFileError(f"config file {path} is not valid {kind}: {detail}") from err
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ConfigFileError(f"config file {path} must hold a mapping of option: value")
        return {dashless(k): {dashless(n): v for n, v in v.items()} if isinstance(v, dict) else v
                for k, v in values.items()}


def dashless(key: Any) -> str:
    return str(key).replace("-", "_")


def top_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS]


def option_owners() -> dict[str, str | None]:
    """Every flat option name -> the section that holds it (None: `TrainConfig` itself)."""
    owners: dict[str, str | None] = {f.name: None for f in top_fields()}
    for name, section in SECTIONS.items():
        owners.update({f.name: name for f in dataclasses.fields(section)})
    return owners


def resolve(cfg: TrainConfig, runtime: Runtime) -> TrainConfig:
    """`cfg` as it runs on `runtime`: the one place where options that depend on the runtime are decided.

    - precision `auto`: bf16 autocast on a GPU, fp32 elsewhere;
    - FSDP: asked for, or Accelerate's own setting;
    - depth-wise adapters (`depth_lora_rank` None): the default recipe's rank where the run can use
      them. They are switched per loop, which dense runs, plain LoRA, FSDP and activation
      checkpointing cannot replay: those runs train without them, and refuse them when asked for;
    - a dense run's objective is its one loop, supervised.
    """
    b = cfg.build
    fsdp = cfg.fsdp or runtime.fsdp
    precision = cfg.precision if cfg.precision != "auto" else "bf16" if runtime.device == "cuda" else "fp32"
    replays = not (fsdp or cfg.gradient_checkpointing)
    rank = b.depth_lora_rank
    if rank is None:
        rank = DEFAULT["depth_lora_rank"] if b.looped and b.lora_rank == 0 and replays else 0
    if rank > 0 and not replays:
        raise ValueError("depth-wise adapters are switched per loop, which activation checkpointing and FSDP do "
                         "not replay: pass --depth-lora-rank 0, or drop --gradient-checkpointing/--fsdp")
    if fsdp and b.lora_rank > 0:
        raise ValueError("LoRA adapters cannot be trained with FSDP: drop --fsdp (replicated training "
                         "supports LoRA) or train full weights with --lora-rank 0")
    rds = cfg.rds if b.looped else dataclasses.replace(cfg.rds, **ONE_LOOP)
    return dataclasses.replace(cfg, build=dataclasses.replace(b, depth_lora_rank=rank), rds=rds, fsdp=fsdp,
                               precision=precision)
