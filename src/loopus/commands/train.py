"""`loopus train --model M --data D --out DIR [flags | --config FILE]`: RDS post-training or a dense baseline.

Flags override the values in `--config FILE` (YAML or JSON, keys as the long flag names), which
override the defaults. Multi-process: `accelerate launch -m loopus.cli train ...` (same flags).
"""

from __future__ import annotations

import argparse
import json

from ..train.config import FREEZABLE, TrainConfig


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _ints(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p.strip()]


def _strings(text: str) -> list[str]:
    return [p for p in text.split(",") if p.strip()]


# flag -> (type, help); the destination is the TrainConfig field of the same name
FLAGS: dict[str, tuple[object, str]] = {
    "model": (str, "embedded name (gemma-3-270m), base checkpoint dir, hub id, or a LoopUS checkpoint dir"),
    "data": (str, "data directory (default $LOOPUS_DATA) or a .txt/.jsonl file"),
    "out": (str, "output directory: the trained model (save_pretrained), logs/, checkpoints/"),
    "mode": (str, "loopus (random deep supervision) or dense (the unlooped base on the same tokens)"),
    "encoder_layers": (int, "split for a plain base model: layers run once before the loop"),
    "decoder_layers": (int, "split for a plain base model: layers run once after the loop"),
    "gate_rank": (int, "gate bottleneck when converting"),
    "gate_init": (float, "gate mixing share at init when converting"),
    "freeze": (_strings, f"comma list of frozen parts ({', '.join(FREEZABLE)}) or none (default: "
                         "embeddings,encoder; embeddings,encoder,reasoning,decoder,head keeps one loop the base)"),
    "lora_rank": (int, "> 0: train LoRA adapters (PEFT) of this rank instead of full weights"),
    "lora_alpha": (float, "LoRA alpha"),
    "lora_dropout": (float, "LoRA dropout"),
    "depth_lora_rank": (int, "> 0: depth-wise LoRA adapters (PEFT) on the reasoning block, active from loop 2 on "
                             "(default 16 where they can run; 0: none)"),
    "depth_lora_alpha": (float, "LoRA alpha of the depth-wise adapters"),
    "depth_lora_count": (int, "distinct depth-wise adapters: 1 (default) shares one across loops 2 on; k > 1 gives "
                              "loops 2..k+1 one each"),
    "gradient_checkpointing": (_bool, "recompute decoder layers in the backward (true/false)"),
    "precision": (str, "auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16"),
    "fsdp": (_bool, "shard weights, gradients and optimiser state across processes with FSDP2 (true/false); "
                    "on by itself under `accelerate launch --use_fsdp`"),
    "corpus": (_strings, "comma list of corpora: NAME, FILE or hf:NAME[:CONFIG], each optionally =WEIGHT"),
    "text_field": (str, "JSONL field holding the text"),
    "seq_len": (int, "tokens per packed sequence"),
    "packing": (str, "documents (each row inside one document, starting with the tokenizer's BOS; default) "
                     "or stream (documents concatenated and cut, rows start mid-document)"),
    "rows_per_doc": (int, "at most this many training rows per document, evenly spaced through it, so a small "
                          "budget covers many documents (default: every row)"),
    "batch_size": (int, "sequences per micro-batch per process"),
    "grad_accum": (int, "micro-batches per optimiser step"),
    "max_steps": (int, "optimiser steps"),
    "max_tokens": (int, "training tokens (converted to optimiser steps)"),
    "val_tokens": (int, "validation tokens"),
    "val_fraction": (float, "documents held out for validation when a corpus has no valid file"),
    "seed": (int, "seed for init, data order and the horizon/supervision draws"),
    "threads": (int, "torch CPU threads (0: default)"),
    "lr": (float, "peak learning rate"),
    "new_module_lr_mult": (float, "lr multiplier for the new gate and confidence head"),
    "adapter_lr_mult": (float, "lr multiplier for the depth-wise adapters"),
    "min_lr_ratio": (float, "final lr / peak lr"),
    "weight_decay": (float, "AdamW weight decay (matrices only)"),
    "warmup_steps": (int, "linear warm-up, in optimiser steps (default: --warmup-ratio of the run)"),
    "warmup_ratio": (float, "warm-up as a share of the run's optimiser steps, when --warmup-steps is not given"),
    "schedule": (str, "cosine, linear or constant (after warm-up)"),
    "max_grad_norm": (float, "gradient clipping norm (0: off)"),
    "horizon_min": (int, "smallest sampled horizon T"),
    "horizon_max": (int, "largest sampled horizon T"),
    "supervised_min": (int, "fewest supervised steps |S|"),
    "supervised_max": (int, "most supervised steps |S|"),
    "grad_steps": (int, "k: loop steps with gradient before each supervised step"),
    "supervise_last": (_bool, "always supervise step T (true/false)"),
    "supervise_first": (_bool, "always supervise loop 1 (true/false)"),
    "beta_mono": (float, "weight of the monotonicity loss"),
    "lambda_conf": (float, "weight of the confidence loss"),
    "conf_margin": (float, "nats an early exit may cost and still count as safe"),
    "kl_base": (float, "weight of KL(base model || loop 1) (needs --supervise-first true)"),
    "ce_chunk": (int, "positions per cross-entropy chunk"),
    "log_every": (int, "log every N optimiser steps"),
    "eval_every": (int, "validate every N steps (0: before and after only)"),
    "eval_loops": (_ints, "loop counts to validate at, e.g. 1,2,4,8"),
    "eval_batch_size": (int, "validation batch size"),
    "eval_at_start": (_bool, "validate before training (true/false)"),
    "eval_at_end": (_bool, "validate after training (true/false)"),
    "save_every": (int, "checkpoint every N optimiser steps (0: final model only)"),
    "keep_checkpoints": (int, "checkpoints kept"),
    "progress": (_bool, "progress bar (true/false)"),
    "tensorboard": (_bool, "TensorBoard logs (true/false)"),
    "log_with": (_strings, "comma list of more Accelerate trackers (wandb, mlflow, aim, comet_ml, ...); "
                           "TensorBoard is --tensorboard"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="post-train a LoopUS model with random deep supervision (or a dense baseline)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in --out")
    for name, (kind, text) in FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=text)
    p.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    if args.config:
        values.update(TrainConfig.read_file(args.config))
    for name in FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    if args.resume:
        values["resume"] = True
    for required in ("out",):
        if not values.get(required):
            raise ValueError(f"--{required} is required (as a flag or in --config)")
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    from ..train.trainer import Trainer

    cfg = config_from_args(args)
    trainer = Trainer(cfg)
    history = trainer.train()
    if trainer.is_main:
        summary = {k: {n: round(v["loss"], 4) for n, v in r.items()} for k, r in history.items() if k in ("before", "after")}
        print(json.dumps({"out": cfg.out, "steps": trainer.step, "tokens": trainer.tokens, "valid_loss": summary,
                          "tokens_per_s": round(history["throughput"]["tokens_per_s"], 1)}))
    return 0

