"""The training loop on Hugging Face Accelerate: one process or several (`accelerate launch`), same code.

RDS calls `backward()` several times per batch (once per supervised step), which DDP's
forward/backward pairing does not allow, so the model is *not* wrapped in DDP. Two ways to run on P
processes, both from this loop:

- replicated (default): Accelerate sets up the process group, device and autocast; after the
  micro-batches of an optimiser step the gradients are averaged with one all-reduce per parameter,
  and every process takes the same AdamW step (weights are broadcast from rank 0 at start);
- sharded (`--fsdp`, or `accelerate launch --use_fsdp`): FSDP2 units per decoder layer, gate,
  confidence head and root (`sharding.py`); each backward reduce-scatters, each process updates its
  shard. Checkpoints and the final model are gathered, so both ways write the same files.

Each process reads its own slice of every global batch, so P processes see P times the tokens per
step and the data order does not depend on P's choice of sharding.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, is_loopus_checkpoint
from .checkpointing import (
    finalize_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prepare_staging,
    set_rng_state,
    staging_dir,
    write_rank_rng,
)
from .config import TrainConfig
from .data import PackedData, build_data
from .evaluation import evaluate
from .objective import dense_step, rds_step, sample_plan
from .optim import build_optimizer, build_scheduler
from .params import apply_freeze, apply_lora, count_parameters, enable_gradient_checkpointing, trainable_state
from .sharding import clip_gradients, gather_full, gather_optimizer, gather_trainable, load_sharded, shard_model

# a resumed run must agree with its checkpoint on everything that decides the data and the plan
RESUME_KEYS = ("mode", "corpus", "seq_len", "packing", "batch_size", "grad_accum", "seed", "horizon_min",
               "horizon_max", "supervised_min", "supervised_max", "grad_steps", "supervise_last", "supervise_first",
               "lora_rank", "depth_lora_rank", "freeze")


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN/inf; training stopped before the optimiser step."""


def build_model(cfg: TrainConfig, model=None, tokenizer=None):
    """The model to train (LoopUS or the plain base model for dense mode) and its tokenizer."""
    split_given = cfg.encoder_layers is not None and cfg.decoder_layers is not None
    if model is None:
        from ..zoo import check_base_exists

        check_base_exists(cfg.model)
    if model is None and cfg.mode == "loopus" and not split_given and not is_loopus_checkpoint(cfg.model):
        raise ValueError(
            f"{cfg.model} is a plain base model: give the split with --encoder-layers N --decoder-layers N "
            "(or pass a converted LoopUS checkpoint)"
        )
    if model is None:
        if is_loopus_checkpoint(cfg.model):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            import loopus  # noqa: F401  (registers the Auto classes)

            model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.model)
        else:
            from ..zoo import load_base

            model, loaded_tokenizer = load_base(cfg.model)
            tokenizer = tokenizer or loaded_tokenizer
    looped = hasattr(model, "loop_step")
    if cfg.mode == "dense" and looped:
        # the dense baseline trains the same layers as LoopUS: keep the split for --freeze encoder/decoder
        if not split_given:
            cfg.encoder_layers, cfg.decoder_layers = model.config.encoder_layers, model.config.decoder_layers
        model = model.base
    elif cfg.mode == "loopus" and not looped:
        if cfg.encoder_layers is None or cfg.decoder_layers is None:
            raise ValueError(
                f"{cfg.model} is a plain base model: give the split with --encoder-layers N --decoder-layers N "
                "(or pass a converted LoopUS checkpoint)"
            )
        from ..convert import convert

        model = convert(model, cfg.encoder_layers, cfg.decoder_layers, gate_rank=cfg.gate_rank, gate_init=cfg.gate_init,
                        depth_lora_rank=cfg.depth_lora_rank, depth_lora_alpha=cfg.depth_lora_alpha)
    elif cfg.depth_lora_rank > 0 and model.config.depth_lora_rank == 0:
        model.add_depth_adapters(cfg.depth_lora_rank, cfg.depth_lora_alpha)
    if cfg.depth_lora_rank > 0 and model.config.depth_lora_rank != cfg.depth_lora_rank:
        raise ValueError(f"{cfg.model} has depth adapters of rank {model.config.depth_lora_rank}, not "
                         f"--depth-lora-rank {cfg.depth_lora_rank}")
    return model.float().train(), tokenizer


def check_seq_len(cfg: TrainConfig, model) -> None:
    """Refuse a `seq_len` beyond the positions the base model was built for (before any training work)."""
    config = model.config
    config = getattr(config, "base_config", None) or config  # LoopUS wraps the base model's config
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.seq_len > limit:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the base model's max_position_embeddings {limit}: "
                         f"use --seq-len {limit} or less")


class Trainer:
    """Build everything from a `TrainConfig` and run it: `Trainer(cfg).train()` returns the metrics.

    `model`, `tokenizer` and `data` may be given directly (tests, notebooks); otherwise they are loaded
    from `cfg.model` and `cfg.corpus`. `callbacks` are called as `fn(trainer, step, metrics)` after each
    optimiser step.
    """

    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None, data: PackedData | None = None,
                 callbacks: list[Callable[["Trainer", int, dict], None]] | None = None,
                 accelerator: Accelerator | None = None):
        self.cfg = cfg
        self.callbacks = callbacks or []
        precision = cfg.precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "fp32"
        self.accelerator = accelerator or Accelerator(mixed_precision="bf16" if precision == "bf16" else "no")
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.sharded = cfg.fsdp or acc.distributed_type == DistributedType.FSDP
        if self.sharded and cfg.lora_rank > 0:
            raise ValueError("LoRA adapters cannot be trained with FSDP: drop --fsdp (replicated training "
                             "supports LoRA) or train full weights with --lora-rank 0")
        if self.sharded and not torch.distributed.is_initialized():
            raise ValueError("--fsdp needs a process group: start the run with `accelerate launch` (or torchrun)")
        self.out = Path(cfg.out)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        set_seed(cfg.seed)

        model, self.tokenizer = build_model(cfg, model, tokenizer)
        self.looped = hasattr(model, "loop_step")
        check_seq_len(cfg, model)
        split = (cfg.encoder_layers or 0, cfg.decoder_layers or 0)
        apply_freeze(model, cfg.frozen, *split)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.core = model                       # the module whose pieces (encode, loop_step, ...) run
        self.module = model                     # the module whose parameters train (a PeftModel with LoRA)
        if cfg.lora_rank > 0:
            self.module = apply_lora(model, cfg.frozen, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, *split)
            self.core = self.module.base_model.model
        self.module.to(acc.device)
        if self.world > 1:
            for p in self.module.parameters():
                torch.distributed.broadcast(p.data, src=0)
        if self.sharded:
            shard_model(self.core, bf16=precision == "bf16")
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        # KL toward the base at loop 1: a frozen copy of the model as built, i.e. before any training
        # (on resume too: the checkpoint's weights are loaded into the trained copy only)
        self.reference = copy.deepcopy(self.core).eval().requires_grad_(False) if cfg.kl_base > 0 else None

        self.total_steps = cfg.total_steps(self.world)
        if data is None:
            if self.tokenizer is None:
                raise ValueError("no tokenizer: pass one, or a model directory that holds one")
            rows = self.total_steps * cfg.batch_size * cfg.grad_accum * self.world
            with acc.main_process_first():
                data = build_data(self.tokenizer, cfg.corpus, cfg.data, cfg.seq_len, rows,
                                  max(1, math.ceil(cfg.val_tokens / cfg.seq_len)), cfg.seed, cfg.text_field,
                                  cfg.val_fraction, cfg.packing)
        self.data = data
        self.optimizer = build_optimizer(self.module, cfg.lr, cfg.weight_decay, cfg.betas, cfg.new_module_lr_mult,
                                         cfg.adapter_lr_mult)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.warmup(self.total_steps), cfg.schedule,
                                         cfg.min_lr_ratio)
        self.step = 0
        self.tokens = 0
        self.history: dict[str, Any] = {}
        self._log_file = None
        self._tb = None

    # -- helpers ------------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor)
        return tensor

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        if self._log_file is None:
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.out / "logs" / "train.jsonl", "a", encoding="utf-8")
            if self.cfg.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.out / "logs" / "tb"))
                except ImportError:
                    self._tb = None
        self._log_file.write(json.dumps(record) + "\n")
        self._log_file.flush()
        if self._tb is not None:
            step = record.get("step", self.step)
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, step)

    def validate(self, tag: str) -> dict[str, dict[str, float]]:
        cfg = self.cfg
        batches = self.data.valid_batches(cfg.eval_batch_size, self.rank, self.world)
        with self.accelerator.autocast():
            result = evaluate(self.core, batches, cfg.eval_loops if self.looped else [1], cfg.conf_margin,
                              cfg.ce_chunk, self.accelerator.device, reduce=self._reduce_sum)
        self.log({"step": self.step, "event": "validation", "tag": tag, "valid": result})
        return result

    # -- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        if self.is_main:
            prepare_staging(self.out, self.step)
        acc.wait_for_everyone()
        write_rank_rng(staging_dir(self.out, self.step), self.rank)
        if self.sharded:
            trainable, optimizer_state = gather_trainable(self.module), gather_optimizer(self.module, self.optimizer)
        else:
            trainable, optimizer_state = trainable_state(self.module), self.optimizer.state_dict()
        acc.wait_for_everyone()
        path = None
        if self.is_main:
            state = {"step": self.step, "micro_batches": self.step * self.cfg.grad_accum, "tokens": self.tokens,
                     "world": self.world, "sharded": self.sharded, "config": self.cfg.to_dict()}
            path = finalize_checkpoint(self.out, self.step, trainable, optimizer_state, self.scheduler, state,
                                       self.cfg.keep_checkpoints)
            self.log({"step": self.step, "event": "checkpoint", "path": str(path)})
        acc.wait_for_everyone()
        return path

    def restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path, self.rank)
        saved = ckpt["state"]["config"]
        current = self.cfg.to_dict()
        # a key the checkpoint lacks predates its option: the run then had the option's default behaviour
        defaults = TrainConfig.defaults()
        diff = {k: (saved.get(k, defaults[k]), current.get(k)) for k in RESUME_KEYS
                if saved.get(k, defaults[k]) != current.get(k)}
        if ckpt["state"].get("world", self.world) != self.world:
            diff["processes"] = (ckpt["state"]["world"], self.world)
        if ckpt["state"].get("sharded", False) != self.sharded:
            diff["fsdp"] = (ckpt["state"].get("sharded", False), self.sharded)
        if diff:
            raise ValueError(f"cannot resume from {path} exactly: settings differ (checkpoint, now): {diff}")
        wanted = trainable_state(self.module)
        missing = sorted(set(wanted) - set(ckpt["trainable"]))
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks trained weights {missing[:3]} ({len(missing)} in all)")
        peaks = [group["initial_lr"] for group in self.optimizer.param_groups]  # this run's peak lrs
        if self.sharded:
            load_sharded(self.module, self.optimizer, {k: ckpt["trainable"][k] for k in wanted}, ckpt["optimizer"])
        else:
            with torch.no_grad():
                for name, p in self.module.named_parameters():
                    if name in wanted:
                        p.copy_(ckpt["trainable"][name].to(p.device, p.dtype))
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self._rebase_schedule(peaks, saved)
        if ckpt["rng"] is not None:
            set_rng_state(ckpt["rng"])
        self.step = int(ckpt["state"]["step"])
        self.tokens = int(ckpt["state"]["tokens"])

    def _rebase_schedule(self, peaks: list[float], saved: dict[str, Any]) -> None:
        """Make this run's lr settings take effect after the optimiser and scheduler state brought back the old.

        The schedule is re-based to this run's peak lrs (`peaks`, one per param group) at the restored
        step; with the checkpoint's own settings this recomputes the restored values exactly.
        """
        cfg = self.cfg
        groups, scheduler = self.optimizer.param_groups, self.scheduler
        if len(peaks) != len(groups) or len(scheduler.base_lrs) != len(groups):
            raise ValueError(f"cannot resume: the checkpoint's optimiser has {len(groups)} param groups, this run "
                             f"builds {len(peaks)}")
        before = [group["lr"] for group in groups]
        scheduler.base_lrs = list(peaks)
        now = [peak * factor(scheduler.last_epoch) for peak, factor in zip(peaks, scheduler.lr_lambdas)]
        for group, peak, lr in zip(groups, peaks, now):
            group["initial_lr"] = peak
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        scheduler._last_lr = [float(group["lr"]) for group in groups]
        old_lr, old_mult = saved.get("lr", cfg.lr), saved.get("new_module_lr_mult", cfg.new_module_lr_mult)
        if (old_lr, old_mult) != (cfg.lr, cfg.new_module_lr_mult) or before != now:
            if old_lr != cfg.lr:
                message = f"resuming with lr {cfg.lr} (checkpoint had {old_lr})"
            elif old_mult != cfg.new_module_lr_mult:
                message = (f"resuming with new-module lr multiplier {cfg.new_module_lr_mult} (checkpoint had "
                           f"{old_mult})")
            else:
                message = "resuming with this run's schedule settings"
            message += (f": schedule re-based, lr at step {scheduler.last_epoch} is {now[0]:.6g} "
                        f"(checkpoint had {float(before[0]):.6g})")
            if self.is_main:
                print(message, flush=True)
            self.log({"step": scheduler.last_epoch, "event": "lr_rebased", "message": message,
                      "lr": cfg.lr, "checkpoint_lr": old_lr, "group_lrs": now})

    # -- one optimiser step -------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            index = self.step * cfg.grad_accum + micro
            inputs, labels = self.data.batch(index, cfg.batch_size, self.rank, self.world)
            inputs, labels = inputs.to(acc.device), labels.to(acc.device)
            common = dict(ce_chunk=cfg.ce_chunk, loss_scale=1.0 / cfg.grad_accum, backward=acc.backward,
                          autocast=acc.autocast)
            if self.looped:
                generator = torch.Generator().manual_seed(cfg.seed * 7919 + index)
                plan = sample_plan(generator, cfg.horizon_min, cfg.horizon_max, cfg.supervised_min,
                                   cfg.supervised_max, cfg.grad_steps, cfg.supervise_last, cfg.supervise_first)
                metrics = rds_step(self.core, inputs, labels, plan, beta_mono=cfg.beta_mono,
                                   lambda_conf=cfg.lambda_conf, conf_margin=cfg.conf_margin,
                                   reference=self.reference, kl_base=cfg.kl_base, **common)
            else:
                metrics = dense_step(self.core, inputs, labels, **common)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / cfg.grad_accum
        if self.world > 1 and not self.sharded:  # FSDP has reduce-scattered in each backward already
            # Every process draws the same plan, so the same parameters hold gradients everywhere. Those
            # without one stay None, as in one process: AdamW then skips them (a zero gradient would
            # still advance their step count and bias correction).
            for p in self.params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(self.world)
        grad_norm = clip_gradients(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        losses = [v for k, v in totals.items() if k.startswith(("lm", "conf", "mono"))]
        bad = torch.tensor(float(not all(math.isfinite(v) for v in losses) or "nonfinite" in totals
                                 or not torch.isfinite(grad_norm)), device=acc.device)
        if float(self._reduce_sum(bad)) > 0:
            last = latest_checkpoint(self.out)
            shown = {k: round(v, 4) for k, v in totals.items() if k.startswith(("lm", "conf", "mono"))}
            raise TrainingDiverged(
                f"non-finite loss or gradient at optimiser step {self.step + 1} (losses {shown}, grad norm "
                f"{float(grad_norm)}); stopped before the update, no checkpoint written. Last good checkpoint: "
                f"{last if last else 'none'} (resume from it with --resume, e.g. with a lower --lr)"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.tokens += cfg.tokens_per_step(self.world)
        totals["grad_norm"] = float(grad_norm)
        return totals

    # -- the run ------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.resume:
            last = latest_checkpoint(self.out)
            if last is not None:
                self.restore(last)
                if self.is_main:
                    print(f"resumed from {last} at step {self.step}", flush=True)
        elif list_checkpoints(self.out):
            raise ValueError(f"{self.out} already holds checkpoints: pass --resume to continue, or another --out")
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
            trainable, total = count_parameters(self.module)
            self.log({"step": self.step, "event": "start", "trainable_params": trainable, "total_params": total,
                      "processes": self.world, "train_rows": int(self.data.train.shape[0]),
                      "valid_rows": int(self.data.valid.shape[0]), "mix": self.data.mix,
                      "total_steps": self.total_steps})
        if cfg.eval_at_start and self.step == 0 and self.data.valid.shape[0]:
            self.history["before"] = self.validate("before")
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.is_main and cfg.progress),
                   unit="step", dynamic_ncols=True, desc=f"train[{cfg.mode}]")
        per_step = cfg.tokens_per_step(self.world)
        started = time.perf_counter()
        steps_here = 0
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            metrics = self.train_step()
            elapsed = time.perf_counter() - t0
            steps_here += 1
            metrics.update(step=self.step, tokens=self.tokens, lr=self.scheduler.get_last_lr()[0],
                           step_s=elapsed, tokens_per_s=per_step / elapsed)
            if cfg.log_every and self.step % cfg.log_every == 0:
                self.log(metrics)
            supervised = "  ".join(f"L@{k[3:]} {v:.3f}" for k, v in metrics.items() if k.startswith("lm@"))
            bar.set_postfix_str(f"loss {metrics['lm']:.3f}  {supervised}  {metrics['tokens_per_s']:.0f} tok/s")
            bar.update(1)
            for callback in self.callbacks:
                callback(self, self.step, metrics)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self.history[f"step{self.step}"] = self.validate(f"step{self.step}")
        bar.close()
        wall = time.perf_counter() - started
        if cfg.eval_at_end and self.data.valid.shape[0]:
            self.history["after"] = self.validate("after")
        self.history["throughput"] = {"steps": steps_here, "seconds": wall,
                                      "tokens_per_s": steps_here * per_step / wall if wall > 0 else 0.0}
        self.save_final()
        return self.history

    def final_model(self):
        if self.cfg.lora_rank > 0:
            return self.module.merge_and_unload()
        return self.core

    def save_final(self) -> None:
        """save_pretrained into DIR (through a temporary dir and os.replace per file)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        weights = gather_full(self.core) if self.sharded else None  # a collective: before the rank check
        if self.is_main:
            model = self.final_model()
            values = weights.items() if weights is not None else model.named_parameters()
            bad = [n for n, p in values if not torch.isfinite(p).all()]
            if bad:
                raise CheckpointError(f"refusing to save non-finite weights ({bad[:3]})")
            if self.cfg.gradient_checkpointing:
                model.gradient_checkpointing_disable()
            tmp = self.out / ".final-tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, state_dict=weights)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            for f in tmp.iterdir():
                os.replace(f, self.out / f.name)
            tmp.rmdir()
            (self.out / "metrics.json").write_text(json.dumps(self.history, indent=1))
            self.log({"step": self.step, "event": "done", **{k: v for k, v in self.history.items()}})
            if self._tb is not None:
                self._tb.close()
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
        acc.wait_for_everyone()


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def train(cfg: TrainConfig, **kwargs) -> dict[str, Any]:
    """Build a `Trainer` from `cfg` and run it; returns validation metrics and throughput."""
    return Trainer(cfg, **kwargs).train()
