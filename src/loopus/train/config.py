"""`TrainConfig`: every choice a training run makes, settable from CLI flags or a YAML/JSON file."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import LoopUSConfig

MODES = ("loopus", "dense")
FREEZABLE = ("embeddings", "encoder", "reasoning", "adapters", "gate", "decoder", "head", "confidence")
MODEL_DEFAULTS = LoopUSConfig()  # the conversion options take the model config's defaults, stated there once
# The default recipe (issue-11 study, docs/RESULTS.md, "The default"): the layers from the encoder's end on
# train, as in the dense baseline, and depth-wise adapters of this rank act from loop 2 on where a run can use
# them (not dense runs, --lora-rank, FSDP or activation checkpointing). On rows spread over many documents this
# matched dense at one loop; freezing every base weight instead gave up 2-4% of held-out perplexity for a
# second loop that only recovers part of it.
DEFAULT_DEPTH_LORA_RANK = 16
FULL_WEIGHT_FREEZE = ["embeddings", "encoder"]
# The frozen-base option (the study's depth_only arm): only the depth adapters, gate and confidence head
# train, so one loop stays exactly the base model after training.
FROZEN_BASE_FREEZE = ["embeddings", "encoder", "reasoning", "decoder", "head"]


@dataclass
class TrainConfig:
    # what to train
    model: str = "gemma-3-270m"          # embedded name, base checkpoint dir, hub id, or a LoopUS checkpoint dir
    out: str = "runs/train"
    mode: str = "loopus"                 # loopus (random deep supervision) | dense (unlooped base, same tokens)
    encoder_layers: int | None = None    # split used when `model` is a plain base model (required then)
    decoder_layers: int | None = None
    gate_rank: int = MODEL_DEFAULTS.gate_rank
    gate_init: float = MODEL_DEFAULTS.gate_init
    freeze: list[str] | None = None      # None: FULL_WEIGHT_FREEZE (FROZEN_BASE_FREEZE keeps one loop the base)
    lora_rank: int = 0                   # > 0: LoRA adapters (PEFT) on the trainable transformer layers
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    depth_lora_rank: int | None = None   # > 0: depth-wise LoRA on the reasoning block, loop 2 on; None: the
                                         # recipe's rank where a run can use them (see resolve_recipe), else 0
    depth_lora_alpha: float = MODEL_DEFAULTS.depth_lora_alpha
    depth_lora_count: int = MODEL_DEFAULTS.depth_lora_count  # > 1: loops 2..count+1 get an adapter each
    gradient_checkpointing: bool = False
    precision: str = "auto"              # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    fsdp: bool = False                   # shard with FSDP2 (also on when accelerate's config says FSDP)

    # data
    data: str | None = None              # data dir (default $LOOPUS_DATA), or a .txt/.jsonl file
    corpus: list[str] = field(default_factory=lambda: ["enwiki"])  # NAME, FILE, hf:NAME[:CONFIG]; "=W" for a weight
    text_field: str = "text"
    seq_len: int = 512
    packing: str = "documents"           # documents: every row inside one document, BOS-led | stream (legacy)
    rows_per_doc: int | None = None      # at most this many training rows per document, evenly spaced (None: all)
    batch_size: int = 4                  # sequences per micro-batch per process
    grad_accum: int = 1                  # micro-batches per optimiser step
    val_tokens: int = 16384
    val_fraction: float = 0.01           # held out when a corpus has no validation file
    seed: int = 0
    threads: int = 0                     # torch CPU threads (0: torch's default)

    # length of the run (steps wins if both are given)
    max_steps: int | None = None
    max_tokens: int | None = None

    # optimiser and schedule (all counted in optimiser steps)
    lr: float = 7e-6                     # the best of the study's dense sweep, and of the default recipe
                                         # (docs/RESULTS.md, issue 11, "The default recipe at ... 7e-6")
    new_module_lr_mult: float = 1000.0   # lr multiplier for the new gate and confidence head (a near-
                                         # closed gate barely moves at the base weights' lr)
    adapter_lr_mult: float = 10.0        # lr multiplier for the depth-wise adapters
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = None      # None: warmup_ratio of the run
    warmup_ratio: float = 0.1
    schedule: str = "cosine"             # cosine | linear | constant
    max_grad_norm: float = 1.0

    # random deep supervision
    horizon_min: int = 2                 # T ~ U{horizon_min..horizon_max}
    horizon_max: int = 4
    supervised_min: int = 2              # |S| ~ U{supervised_min..supervised_max}, capped at T
    supervised_max: int = 2
    grad_steps: int = 1                  # k: loop steps run with gradient before each supervised step
    supervise_last: bool = True          # T is always in S (the confidence target needs the final state)
    supervise_first: bool = True         # loop 1 is always in S (keeps the one-loop model trained every batch)
    beta_mono: float = 0.1
    lambda_conf: float = 0.1
    conf_margin: float = 0.05            # nats: exit is "safe" if it costs at most this much vs. T loops
    kl_base: float = 0.0                 # weight of KL(base || model) at loop 1 (needs supervise_first)
    ce_chunk: int = 256                  # positions per cross-entropy chunk (caps live logits)

    # logging, validation, checkpoints
    log_every: int = 1
    eval_every: int = 0                  # 0: validate only before and after training
    eval_loops: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    eval_batch_size: int = 4
    eval_at_start: bool = True
    eval_at_end: bool = True
    save_every: int = 0                  # 0: only the final model
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True
    tensorboard: bool = True             # logs/tb
    log_with: list[str] = field(default_factory=list)  # more Accelerate trackers: wandb, mlflow, aim, comet_ml, ...

    def __post_init__(self) -> None:
        self.validate()

    def resolve_recipe(self) -> None:
        """Fill the options left at None with the default recipe. Depth adapters are switched per loop, which
        dense runs, plain LoRA, FSDP and activation checkpointing cannot use: those runs train without them."""
        if self.depth_lora_rank is None:
            usable = self.mode == "loopus" and self.lora_rank == 0 and not (self.fsdp or self.gradient_checkpointing)
            self.depth_lora_rank = DEFAULT_DEPTH_LORA_RANK if usable else 0
        if self.freeze is None:
            self.freeze = list(FULL_WEIGHT_FREEZE)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        self.resolve_recipe()
        for name in ("freeze", "corpus", "log_with"):  # a comma list given as one string
            if isinstance(getattr(self, name), str):
                setattr(self, name, [p for p in getattr(self, name).split(",") if p.strip()])
        if isinstance(self.eval_loops, str):
            self.eval_loops = [int(p) for p in self.eval_loops.split(",") if p.strip()]
        self.betas = tuple(float(b) for b in self.betas)
        unknown = sorted(set(self.freeze) - set(FREEZABLE) - {"none"})
        if unknown:
            raise ValueError(f"--freeze got unknown parts {unknown}; choose from {', '.join(FREEZABLE)} or none")
        if not 1 <= self.horizon_min <= self.horizon_max:
            raise ValueError(f"need 1 <= horizon_min <= horizon_max, got {self.horizon_min}, {self.horizon_max}")
        if not 1 <= self.supervised_min <= self.supervised_max:
            raise ValueError(
                f"need 1 <= supervised_min <= supervised_max, got {self.supervised_min}, {self.supervised_max}"
            )
        if self.grad_steps < 1:
            raise ValueError(f"grad_steps must be >= 1, got {self.grad_steps}")
        for name in ("seq_len", "batch_size", "grad_accum", "ce_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("give the length of the run: --max-steps N or --max-tokens N")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.packing not in ("documents", "stream"):
            raise ValueError(f"packing must be documents or stream, got {self.packing!r}")
        if self.rows_per_doc is not None and (self.rows_per_doc < 1 or self.packing != "documents"):
            raise ValueError(f"rows_per_doc must be >= 1 with packing=documents, got {self.rows_per_doc} with "
                             f"packing={self.packing}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.depth_lora_rank < 0:
            raise ValueError(f"depth_lora_rank must be >= 0, got {self.depth_lora_rank}")
        if self.depth_lora_count < 1:
            raise ValueError(f"depth_lora_count must be >= 1, got {self.depth_lora_count}")
        if self.depth_lora_rank > 0 and self.mode == "dense":
            raise ValueError("depth-wise adapters act from loop 2 on: they need --mode loopus")
        if self.depth_lora_rank > 0 and self.lora_rank > 0:
            raise ValueError("choose one kind of adapter: --lora-rank (every loop) or --depth-lora-rank "
                             "(loop 2 on), not both")
        if self.depth_lora_rank > 0 and (self.gradient_checkpointing or self.fsdp):
            raise ValueError("depth-wise adapters are switched per loop, which activation checkpointing "
                             "and FSDP do not replay: drop --gradient-checkpointing/--fsdp")
        if not 0 <= self.warmup_ratio < 1 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ValueError(f"need warmup_steps >= 0 and 0 <= warmup_ratio < 1, got {self.warmup_steps}, "
                             f"{self.warmup_ratio}")
        if self.kl_base < 0:
            raise ValueError(f"kl_base must be >= 0, got {self.kl_base}")
        if self.kl_base > 0 and (self.mode != "loopus" or not self.supervise_first):
            raise ValueError("--kl-base is a loop-1 term: it needs --mode loopus and --supervise-first true")
        if "tensorboard" in self.log_with:
            raise ValueError("TensorBoard is the `tensorboard` option (on by default): leave it out of log_with")
        if any(n < 1 for n in self.eval_loops):
            raise ValueError(f"eval loop counts must be >= 1, got {self.eval_loops}")

    @property
    def frozen(self) -> set[str]:
        return set(self.freeze) - {"none"}

    def warmup(self, total_steps: int) -> int:
        """Warm-up length in optimiser steps."""
        return self.warmup_steps if self.warmup_steps is not None else round(self.warmup_ratio * total_steps)

    def tokens_per_step(self, num_processes: int = 1) -> int:
        return self.seq_len * self.batch_size * self.grad_accum * num_processes

    def total_steps(self, num_processes: int = 1) -> int:
        if self.max_steps is not None:
            return int(self.max_steps)
        per_step = self.tokens_per_step(num_processes)
        return max(1, -(-int(self.max_tokens) // per_step))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every option's default value."""
        return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {', '.join(sorted(known))}")
        return cls(**values)

    @staticmethod
    def read_file(path: str | Path) -> dict[str, Any]:
        """Options from a YAML or JSON file (keys as in TrainConfig; dashes allowed)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of option: value")
        return {str(k).replace("-", "_"): v for k, v in values.items()}
