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
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast, set_seed
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError
from ..errors import LoopUSError
from .checkpointing import (
    finalize_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_rng,
    prepare_staging,
    set_aside_diverged,
    staging_dir,
)
from .config import RESUMED_AS_WHOLES, Runtime, TrainConfig, resolve
from .data import SHUFFLE_BLOCK, PackedData
from .evaluation import evaluate
from .model import build_model
from .objective import ChunkLoss, rds_step, sample_plan
from .sft import read_chat_template
from .optim import OptimConfig
from .params import (
    apply_freeze,
    apply_lora,
    count_parameters,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    trainable_state,
    weights_digest,
)
from .sharding import (
    all_finite,
    clip_gradients,
    gather_full,
    gather_optimizer,
    gather_trainable,
    load_sharded,
    shard_model,
)
from .tracking import build_trackers, drop_records_after, log_record


class TrainingDiverged(LoopUSError, RuntimeError):
    """A loss or gradient became NaN/inf; training stopped before the optimiser step."""


def check_seq_len(seq_len: int, model) -> None:
    """Refuse a `seq_len` beyond the positions the base model was built for (before any training work)."""
    config = model.config
    config = getattr(config, "base_config", None) or config  # LoopUS wraps the base model's config
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} exceeds the base model's max_position_embeddings {limit}: "
                         f"use --seq-len {limit} or less")


class Trainer:
    """Build everything from a `TrainConfig` and run it: `Trainer(cfg).train()` returns the metrics.

    `model`, `tokenizer` and `data` may be given directly (tests, notebooks); otherwise they are loaded
    from `cfg.build.model` and `cfg.dataset.corpus`. `callbacks` are called as `fn(trainer, step, metrics)` after each
    optimiser step. Records go to the trackers of `tracking.build_trackers`; an `accelerator` passed in
    logs to the trackers it was built with (`Accelerator(log_with=...)`).
    """

    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None, data: PackedData | None = None,
                 callbacks: list[Callable[["Trainer", int, dict], None]] | None = None,
                 accelerator: Accelerator | None = None):
        # the run's own copy, resolved for where it runs; the caller's config is never changed
        self.runtime = Runtime.of(accelerator) if accelerator is not None else Runtime.detect()
        self.cfg = cfg = resolve(cfg, self.runtime)
        self.callbacks = callbacks or []
        self.out = Path(cfg.out)
        self.accelerator = accelerator or Accelerator(
            mixed_precision="bf16" if cfg.precision == "bf16" else "no", log_with=build_trackers(cfg.logging, self.out),
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")))
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.sharded = cfg.fsdp
        if self.sharded and not torch.distributed.is_initialized():
            raise ValueError("--fsdp needs a process group: start the run with `accelerate launch` (or torchrun)")
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        set_seed(cfg.dataset.seed)
        self._build_model(model, tokenizer, bf16=cfg.precision == "bf16")
        self.total_steps = self.cfg.total_steps(self.world)
        self.rows_needed = self.total_steps * cfg.dataset.batch_size * cfg.dataset.grad_accum * self.world
        self.data = data if data is not None else self._build_data()
        if cfg.dataset.chat_template and self.tokenizer is not None:  # saved with the model it trained
            self.tokenizer.chat_template = read_chat_template(cfg.dataset.chat_template)
        self.optimizer = self.cfg.optim.optimizer(self.module)
        self.scheduler = self._schedule(step=0)
        self.step = 0
        self.tokens = 0
        self.history: dict[str, Any] = {}
        # a fused projection + cross entropy for the training steps (e.g. a GPU kernel built on `self.core`'s
        # head, see `objective.chunked_cross_entropy`); None computes the loss in checkpointed chunks
        self.fused_loss: ChunkLoss | None = None

    def _build_model(self, model, tokenizer, bf16: bool) -> None:
        """The model as built (`model.build_model`), frozen, adapted, on this process's device, sharded."""
        acc = self.accelerator
        model, self.tokenizer, build = build_model(self.cfg.build, model=model, tokenizer=tokenizer)
        self.cfg = cfg = dataclasses.replace(self.cfg, build=build)  # dense from a LoopUS model: its split
        check_seq_len(cfg.dataset.seq_len, model)
        self.model_digest = weights_digest(model)  # the starting weights: a resume must start from the same
        apply_freeze(model, build.frozen, *build.split)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.core = model                       # the module whose pieces (encode, loop_step, ...) run
        self.module = model                     # the module whose parameters train (a PeftModel with LoRA)
        if build.lora_rank > 0:
            self.module = apply_lora(model, build.frozen, build.lora_rank, build.lora_alpha, build.lora_dropout,
                                     *build.split)
            self.core = self.module.base_model.model
        self.module.to(acc.device)
        broadcast([p.detach() for p in self.module.parameters()])  # every process starts from rank 0's weights
        if self.sharded:
            shard_model(self.core, bf16=bf16)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        # KL toward the base at loop 1: a frozen copy of the model as built, i.e. before any training
        # (on resume too: the checkpoint's weights are loaded into the trained copy only)
        self.reference = copy.deepcopy(self.core).eval().requires_grad_(False) if cfg.rds.kl_base > 0 else None

    def _build_data(self) -> PackedData:
        cfg = self.cfg.dataset
        if self.tokenizer is None:
            raise ValueError("no tokenizer: pass one, or a model directory that holds one")
        with self.accelerator.main_process_first():
            # whole shuffle blocks: the rows this run reads are then the first ones of any longer run
            return cfg.load(self.tokenizer, -(-self.rows_needed // SHUFFLE_BLOCK) * SHUFFLE_BLOCK)

    def _schedule(self, step: int) -> torch.optim.lr_scheduler.LambdaLR:
        return self.cfg.optim.scheduler(self.optimizer, self.total_steps, step)

    # -- helpers ------------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, record: dict[str, Any]) -> None:
        """Append `record` to logs/train.jsonl and send its numbers to the other trackers (main process)."""
        log_record(self.accelerator, record, record.get("step", self.step))

    def validate(self, tag: str) -> dict[str, dict[str, float]]:
        cfg = self.cfg
        batches = tqdm(self.data.valid_batches(cfg.logging.eval_batch_size, self.rank, self.world), unit="batch",
                       desc=f"validate[{tag}]", disable=not (self.is_main and cfg.logging.progress), leave=False,
                       dynamic_ncols=True)
        with self.accelerator.autocast():
            result = evaluate(self.core, batches, cfg.logging.eval_loops, cfg.rds, self.accelerator.device,
                              reduce=self.accelerator.reduce)
        self.log({"step": self.step, "event": "validation", "tag": tag, "valid": result})
        return result

    # -- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        if float(acc.reduce(torch.tensor(float(not all_finite(self.params)), device=acc.device))) > 0:
            last = latest_checkpoint(self.out)
            raise TrainingDiverged(
                f"the weights became non-finite by optimiser step {self.step}: no checkpoint written. Last good "
                f"checkpoint: {last if last else 'none'} (resume from it with --resume and a lower --lr)")
        if self.is_main:
            prepare_staging(self.out, self.step)
        acc.wait_for_everyone()
        acc.save_state(str(staging_dir(self.out, self.step)))  # this process's RNG states
        if self.sharded:
            trainable, optimizer_state = gather_trainable(self.module), gather_optimizer(self.module, self.optimizer)
        else:
            trainable, optimizer_state = trainable_state(self.module), self.optimizer.state_dict()
        acc.wait_for_everyone()
        path = None
        if self.is_main:
            state = {"step": self.step, "micro_batches": self.step * self.cfg.dataset.grad_accum,
                     "tokens": self.tokens, "world": self.world, "sharded": self.sharded, "config": self.cfg.to_dict(),
                     "model_digest": self.model_digest}
            path = finalize_checkpoint(self.out, self.step, trainable, optimizer_state, state,
                                       self.cfg.logging.keep_checkpoints)
            self.log({"step": self.step, "event": "checkpoint", "path": str(path)})
        acc.wait_for_everyone()
        return path

    def restore(self, path: Path) -> None:
        """Continue exactly from checkpoint `path`; refuses one written with other data or plan settings."""
        ckpt = load_checkpoint(path)
        # resolved where it ran: a checkpoint of an earlier release holds its options as they were given
        state = ckpt["state"]
        runtime = Runtime(state.get("world", self.world), state.get("sharded", False), self.runtime.device)
        saved = resolve(TrainConfig.saved(state["config"]), runtime)
        diff = {}
        for name in RESUMED_AS_WHOLES:
            then, now = getattr(saved, name).to_dict(), getattr(self.cfg, name).to_dict()
            diff.update({k: (then[k], now[k]) for k in now if then[k] != now[k]})
        if state.get("world", self.world) != self.world:
            diff["processes"] = (state["world"], self.world)
        if state.get("sharded", False) != self.sharded:
            diff["fsdp"] = (state.get("sharded", False), self.sharded)
        if diff:
            raise ValueError(f"cannot resume from {path} exactly: settings differ (checkpoint, now): {diff}")
        if state.get("model_digest", self.model_digest) != self.model_digest:
            raise ValueError(f"cannot resume from {path}: it was trained from other starting weights than "
                             f"{self.cfg.build.model} holds; resume with the model that run started from")
        wanted = trainable_state(self.module)
        missing = sorted(set(wanted) - set(ckpt["trainable"]))
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks trained weights {missing[:3]} ({len(missing)} in all)")
        peaks = [group["initial_lr"] for group in self.optimizer.param_groups]  # this run's peak lrs
        if len(ckpt["optimizer"]["param_groups"]) != len(peaks):
            raise ValueError(f"cannot resume: the checkpoint's optimiser has {len(ckpt['optimizer']['param_groups'])} "
                             f"param groups, this run builds {len(peaks)}")
        if self.sharded:
            load_sharded(self.module, self.optimizer, {k: ckpt["trainable"][k] for k in wanted}, ckpt["optimizer"])
        else:
            with torch.no_grad():
                for name, p in self.module.named_parameters():
                    if name in wanted:
                        p.copy_(ckpt["trainable"][name].to(p.device, p.dtype))
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        if self.is_main:  # the steps after the checkpoint run again: their records go
            drop_records_after(self.out / "logs", self.step)
        self._rebase_schedule(peaks, saved.optim)
        load_rng(self.accelerator, path)

    def _rebase_schedule(self, peaks: list[float], saved: OptimConfig) -> None:
        """Rebuild the schedule at the restored step from this run's peak lrs (`peaks`, one per param group).

        The optimiser state brought back the checkpoint's lrs. With the checkpoint's own settings the
        rebuilt schedule gives the same values exactly; a new `--lr` (or schedule) takes effect here.
        """
        cfg = self.cfg.optim
        before = [float(group["lr"]) for group in self.optimizer.param_groups]
        for group, peak in zip(self.optimizer.param_groups, peaks):
            group["initial_lr"] = peak
        self.scheduler = self._schedule(self.step)
        now = self.scheduler.get_last_lr()
        old_lr, old_mult = saved.lr, saved.new_module_lr_mult
        if (old_lr, old_mult) != (cfg.lr, cfg.new_module_lr_mult) or before != now:
            if old_lr != cfg.lr:
                message = f"resuming with lr {cfg.lr} (checkpoint had {old_lr})"
            elif old_mult != cfg.new_module_lr_mult:
                message = (f"resuming with new-module lr multiplier {cfg.new_module_lr_mult} (checkpoint had "
                           f"{old_mult})")
            else:
                message = "resuming with this run's schedule settings"
            message += (f": schedule re-based, lr at step {self.step} is {now[0]:.6g} "
                        f"(checkpoint had {before[0]:.6g})")
            if self.is_main:
                print(message, flush=True)
            self.log({"step": self.step, "event": "lr_rebased", "message": message,
                      "lr": cfg.lr, "checkpoint_lr": old_lr, "group_lrs": now})

    # -- one optimiser step -------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        grad_accum = cfg.dataset.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(grad_accum):
            index = self.step * grad_accum + micro
            inputs, labels = self.data.batch(index, cfg.dataset.batch_size, self.rank, self.world)
            inputs, labels = inputs.to(acc.device), labels.to(acc.device)
            plan = sample_plan(torch.Generator().manual_seed(cfg.dataset.seed * 7919 + index), cfg.rds,
                               progress=self.step / self.total_steps)
            metrics = rds_step(self.core, inputs, labels, plan, cfg.rds, loss_scale=1.0 / grad_accum,
                               backward=acc.backward, autocast=acc.autocast, reference=self.reference,
                               fused=self.fused_loss)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / grad_accum
        if self.world > 1 and not self.sharded:  # FSDP has reduce-scattered in each backward already
            # Every process draws the same plan, so the same parameters hold gradients everywhere. Those
            # without one stay None, as in one process: AdamW then skips them (a zero gradient would
            # still advance their step count and bias correction).
            for p in self.params:
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        max_norm = cfg.optim.max_grad_norm
        grad_norm = clip_gradients(self.params, max_norm if max_norm > 0 else float("inf"))
        losses = [v for k, v in totals.items() if k.startswith(("lm", "conf", "mono"))]
        bad = torch.tensor(float(not all(math.isfinite(v) for v in losses) or "nonfinite" in totals
                                 or not torch.isfinite(grad_norm)), device=acc.device)
        if float(acc.reduce(bad)) > 0:
            if self.is_main:  # a checkpoint of the weights that just diverged would diverge again on resume
                set_aside_diverged(self.out, self.step)
            acc.wait_for_everyone()
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
            elif self.is_main:
                where = "does not exist" if not self.out.exists() else "holds no checkpoint"
                print(f"--resume: {self.out} {where}; starting from step 0", flush=True)
        elif list_checkpoints(self.out):
            raise ValueError(f"{self.out} already holds checkpoints: pass --resume to continue, or another --out")
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
            trainable, total = count_parameters(self.module)
            self.log({"step": self.step, "event": "start", "config": self.cfg.to_dict(),
                      "trainable_params": trainable, "total_params": total,
                      "processes": self.world, "train_rows": int(self.data.train.shape[0]),
                      "valid_rows": int(self.data.valid.shape[0]), "mix": self.data.mix_of(self.rows_needed),
                      "total_steps": self.total_steps})
            for name, sft in self.data.report.items():
                print(f"SFT data {name}: {sft['format']}, {sft['examples']} training and {sft['valid_examples']} "
                      f"validation examples, {sft['truncated']} truncated from the left of the prompt", flush=True)
                self.log({"step": self.step, "event": "sft_data", "corpus": name, **sft})
        logging = cfg.logging
        if logging.eval_at_start and self.step == 0 and self.data.valid.shape[0]:
            self.history["before"] = self.validate("before")
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.is_main and logging.progress),
                   unit="step", dynamic_ncols=True, desc=f"train[{cfg.build.mode}]")
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
            if logging.log_every and self.step % logging.log_every == 0:
                self.log(metrics)
            supervised = "  ".join(f"L@{k[3:]} {v:.3f}" for k, v in metrics.items() if k.startswith("lm@"))
            bar.set_postfix_str(f"loss {metrics['lm']:.3f}  {supervised}  {metrics['tokens_per_s']:.0f} tok/s")
            bar.update(1)
            for callback in self.callbacks:
                callback(self, self.step, metrics)
            if logging.save_every and self.step % logging.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
            if logging.eval_every and self.step % logging.eval_every == 0 and self.step < self.total_steps:
                self.history[f"step{self.step}"] = self.validate(f"step{self.step}")
        bar.close()
        wall = time.perf_counter() - started
        if steps_here:
            self.save_checkpoint()  # a finished run can be extended (`--resume --max-steps N`)
        if logging.eval_at_end and self.data.valid.shape[0]:
            self.history["after"] = self.validate("after")
        self.history["throughput"] = {"steps": steps_here, "seconds": wall,
                                      "tokens_per_s": steps_here * per_step / wall if wall > 0 else 0.0}
        self.save_final()
        return self.history

    def final_model(self):
        if self.cfg.build.lora_rank > 0:
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
                disable_gradient_checkpointing(model)
            tmp = self.out / ".final-tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, state_dict=weights)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            for f in tmp.iterdir():
                os.replace(f, self.out / f.name)
            tmp.rmdir()
            (self.out / "metrics.json").write_text(json.dumps(self.history, indent=1))
            self.log({"step": self.step, "event": "done", **self.history})
            for tracker in acc.trackers:
                tracker.finish()
        acc.wait_for_everyone()


def train(cfg: TrainConfig, **kwargs) -> dict[str, Any]:
    """Build a `Trainer` from `cfg` and run it; returns validation metrics and throughput."""
    return Trainer(cfg, **kwargs).train()
