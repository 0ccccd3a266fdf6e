"""Staged representation dynamics of a base model, and the encoder / reasoning / decoder split they imply.

`measure_dynamics` runs the base model on calibration text and records, for every layer l (the
transition h_l -> h_{l+1} of the residual stream, h_0 = the embeddings fed to layer 0):

    cosine            mean cos(h_l, h_{l+1})                              ~1 = the layer barely turns the state
    relative_update   mean ||h_{l+1} - h_l|| / ||h_l||                    size of the layer's write
    cka               linear CKA(h_l, h_{l+1}) over tokens               similarity of the token geometry
    lens_kl           mean KL(p_final || p_lens(h_{l+1}))                 logit lens: distance to the answer
    lens_step_kl      mean KL(p_lens(h_{l+1}) || p_lens(h_l))             vocabulary-space change of the layer
    lens_top1         share of tokens whose lens top-1 equals the final top-1

where p_lens(h) = softmax(lm_head(final_norm(h))) (with the model's logit soft-capping). The first
position of every window (BOS, an attention sink with an outsized norm) is left out.

`loopus.split.choose_split` turns the curves into (encoder, decoder) layer counts; see its docstring
for the algorithm. `analyze` is both steps plus `split.json` and the PNG, as used by `loopus analyze`;
`resolve_split` and `convert_auto` take a split given as "auto", a split.json or a pair to `convert`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from .config import SplitError
from .convert import convert
from .dynamics_plot import plot_dynamics
from .modeling import LoopUSForCausalLM, soft_cap
from .options import CALIBRATION_TOKENS
from .paths import data_path
from .split import SplitConstraints, choose_split, load_split
from .text import read_documents, token_windows
from .zoo import load_base

DEFAULT_CALIBRATION = ("enwiki/valid.jsonl", "wikitext2/tokenized/valid.txt", "eltec_eng/valid.jsonl")


# -- calibration text -------------------------------------------------------------------------------


def calibration_text(
    data: str | os.PathLike | None = None, file: str | os.PathLike | None = None, max_chars: int | None = None
) -> tuple[str, str]:
    """Calibration text and where it came from.

    `file` is a path (absolute, or relative to the data dir) to a `.jsonl` file with a `text` field or a
    plain-text file. Without it, the first of `DEFAULT_CALIBRATION` present in the data dir is used:
    held-out Wikipedia (`enwiki/valid.jsonl`), never the WikiText-2 test split used for evaluation.
    `data` may also be a single `.jsonl`/`.txt` file: then that file is the calibration text (and a
    relative `file` is looked for next to it).
    """
    if file is not None:
        path = Path(file).expanduser()
        if not path.is_absolute() and not path.exists():
            root = data_path(data)
            path = (root.parent if root.is_file() else root) / path
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {file} not found (looked at {path})")
    elif (root := data_path(data)).is_file():
        path = root
    else:
        candidates = [root / name for name in DEFAULT_CALIBRATION]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"no calibration text in {root}: expected one of {', '.join(DEFAULT_CALIBRATION)}; "
                "pass --calibration FILE"
            )
        path = found[0]
    pieces, size = [], 0
    for text in read_documents(path):
        text = text.strip()
        if not text:
            continue
        pieces.append(text)
        size += len(text)
        if max_chars is not None and size >= max_chars:
            break
    joined = "\n\n".join(pieces)
    if not joined.strip():
        raise ValueError(f"calibration data {path} is empty: no text to run the model on")
    return joined, str(path)


# -- measuring ---------------------------------------------------------------------------------------


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers: not a supported decoder-only causal LM")
    return layers


def _lens_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logit lens: the base model's final norm and head (soft-capped like its output) applied to `hidden`."""
    logits = model.lm_head(model.model.norm(hidden)).float()
    return soft_cap(logits, getattr(model.config, "final_logit_softcapping", None))


def _linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two (tokens, hidden) matrices, computed in feature space (cheap for tokens >> hidden)."""
    x = (x - x.mean(0)).double()
    y = (y - y.mean(0)).double()
    cross = (x.T @ y).pow(2).sum()
    norm = torch.sqrt((x.T @ x).pow(2).sum() * (y.T @ y).pow(2).sum())
    return float(cross / norm) if norm > 0 else 1.0


def _cka_matrix(states: list[torch.Tensor], max_positions: int = 1024) -> list[list[float]]:
    """Linear CKA between every pair of layer states h_0..h_L, on at most `max_positions` positions.

    Token-space form: CKA = <K_i, K_j> / (|K_i| |K_j|) with K = X X^T of the centred states.
    """
    n = states[0].shape[0]
    pick = torch.linspace(0, n - 1, min(n, max_positions)).round().long().unique()
    grams = []
    for h in states:
        x = h[pick].double()
        x = x - x.mean(0)
        grams.append((x @ x.T).float())
    norms = [float(g.double().pow(2).sum().sqrt()) for g in grams]
    size = len(states)
    out = [[1.0] * size for _ in range(size)]
    for i in range(size):
        for j in range(i + 1, size):
            denom = norms[i] * norms[j]
            value = float((grams[i].double() * grams[j].double()).sum()) / denom if denom > 0 else 1.0
            out[i][j] = out[j][i] = value
    return out


@torch.no_grad()
def measure_dynamics(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]] | torch.Tensor,
    lens_tokens: int = 256,
    skip_first: int = 1,
    progress: bool = True,
    cka_positions: int = 1024,
    cka_max_positions: int = 4096,
) -> dict[str, list[float]]:
    """Per-layer signals (see the module docstring) of `model` on windows of token ids.

    `input_ids` is a list of windows (each a list of ids, e.g. BOS + text). The first `skip_first`
    positions of each window are left out of every statistic. The logit lens (a full-vocabulary
    projection per layer) runs on at most `lens_tokens` positions spread evenly over the data;
    0 turns it off. Consecutive-layer CKA uses at most `cka_max_positions` positions, the all-pairs CKA
    matrix at most `cka_positions`.
    """
    windows = [list(map(int, w)) for w in input_ids]
    windows = [w for w in windows if len(w) > skip_first]
    if not windows:
        raise ValueError("calibration data is empty: no window has a token to measure")
    layers = _layers(model)
    num_layers = len(layers)
    total_positions = sum(len(w) - skip_first for w in windows)
    lens_every = max(1, math.ceil(total_positions / lens_tokens)) if lens_tokens > 0 else 0
    # CKA needs the states themselves: keep at most `cka_max_positions` of them (evenly strided) in memory
    keep_every = max(1, math.ceil(total_positions / cka_max_positions))
    device = next(model.parameters()).device

    sums = {name: np.zeros(num_layers) for name in ("cosine", "relative_update", "lens_kl", "lens_step_kl", "lens_top1")}
    collected: list[list[torch.Tensor]] = [[] for _ in range(num_layers + 1)]
    count = lens_count = 0
    norms = np.zeros(num_layers + 1)
    position_offset = 0

    states: list[torch.Tensor] = []

    def pre_hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        states.append(hidden.detach())

    def post_hook(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        states.append(hidden.detach())

    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [layer.register_forward_hook(post_hook) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        for window in tqdm(windows, desc="analyze", unit="window", disable=not progress):
            states.clear()
            batch = torch.tensor([window], device=device)
            try:  # the hidden states come from the hooks: skip the (vocabulary-sized) head where the model can
                model(input_ids=batch, use_cache=False, logits_to_keep=1)
            except TypeError:
                states.clear()
                model(input_ids=batch, use_cache=False)
            if len(states) != num_layers + 1:
                raise RuntimeError(f"expected {num_layers + 1} hidden states from the hooks, got {len(states)}")
            hs = [s[0, skip_first:].float() for s in states]  # (positions, hidden) each
            n = hs[0].shape[0]
            for l in range(num_layers):
                a, b = hs[l], hs[l + 1]
                sums["cosine"][l] += torch.nn.functional.cosine_similarity(a, b, dim=-1).sum().item()
                rel = (b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)
                sums["relative_update"][l] += rel.sum().item()
            keep = torch.tensor([i for i in range(n) if (count + i) % keep_every == 0], dtype=torch.long)
            for l in range(num_layers + 1):
                norms[l] += hs[l].norm(dim=-1).sum().item()
                collected[l].append(hs[l][keep.to(hs[l].device)].cpu())
            count += n
            if lens_every:
                pick = [i for i in range(n) if (position_offset + i) % lens_every == 0]
                position_offset += n
                if pick:
                    idx = torch.tensor(pick, device=hs[0].device)
                    k = len(pick)
                    # The head's weight (vocab x hidden) is read once per call, which is what costs on a CPU:
                    # project several layers' positions per call, at most ~256 rows at a time.
                    per_call = max(1, 256 // k)
                    final = torch.log_softmax(_lens_logits(model, hs[-1][idx]), -1)
                    p_final = final.exp()
                    final_top = final.argmax(-1)
                    previous = None
                    for lo in range(0, num_layers + 1, per_call):
                        group = list(range(lo, min(lo + per_call, num_layers + 1)))
                        rows = torch.cat([hs[l][idx] for l in group])
                        logp = torch.log_softmax(_lens_logits(model, rows), -1).split(k)
                        for l, current in zip(group, logp):
                            if previous is not None:  # layer l-1 turned h_{l-1} into h_l
                                i = l - 1
                                sums["lens_kl"][i] += (p_final * (final - current)).sum(-1).clamp_min(0).sum().item()
                                sums["lens_step_kl"][i] += (
                                    (current.exp() * (current - previous)).sum(-1).clamp_min(0).sum().item()
                                )
                                sums["lens_top1"][i] += (current.argmax(-1) == final_top).float().sum().item()
                            previous = current
                        del logp, rows
                    lens_count += len(pick)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("calibration data is empty: no token positions to measure")
    stacked = [torch.cat(c) for c in collected]
    cka = [_linear_cka(stacked[l], stacked[l + 1]) for l in range(num_layers)]
    cka_matrix = _cka_matrix(stacked, max_positions=cka_positions)
    metrics: dict[str, list[float]] = {
        "cosine": (sums["cosine"] / count).tolist(),
        "relative_update": (sums["relative_update"] / count).tolist(),
        "cka": cka,
        "cka_matrix": cka_matrix,
        "state_norm": (norms / count).tolist(),
    }
    if lens_count:
        for name in ("lens_kl", "lens_step_kl", "lens_top1"):
            metrics[name] = (sums[name] / lens_count).tolist()
    metrics["tokens"] = count  # type: ignore[assignment]
    metrics["lens_tokens"] = lens_count  # type: ignore[assignment]
    return metrics


# -- end to end ----------------------------------------------------------------------------------------


def analyze(
    base_model: Any,
    tokenizer: Any = None,
    *,
    data: str | os.PathLike | None = None,
    calibration: str | os.PathLike | None = None,
    tokens: int = CALIBRATION_TOKENS,
    window: int = 512,
    lens_tokens: int = 128,
    constraints: SplitConstraints | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    name: str | None = None,
) -> dict[str, Any]:
    """Measure `base_model` on calibration text and choose its split; write split.json and dynamics.png to `out`.

    `base_model` is a model or anything `loopus.zoo.load_base` accepts. Returns the split.json content.
    """
    if tokens < 2:
        raise ValueError(f"tokens must be >= 2, got {tokens}")
    if window < 3:
        raise ValueError(f"window must be >= 3, got {window}")
    if not isinstance(base_model, torch.nn.Module):
        name = name or str(base_model)
        base_model, tokenizer = load_base(base_model)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to read calibration text")
    num_layers = len(_layers(base_model))
    constraints = constraints or SplitConstraints()
    constraints.validate(num_layers)  # before the (slow) measurement
    text, source = calibration_text(data, calibration, max_chars=tokens * 8)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    if len(ids) < 2:
        raise ValueError(f"calibration data {source} is empty: it gives {len(ids)} token(s)")
    bos = tokenizer.bos_token_id
    windows = token_windows(ids, bos, window - (bos is not None), min_tokens=2)
    metrics = measure_dynamics(base_model, windows, lens_tokens=lens_tokens, progress=progress)
    choice = choose_split(metrics, constraints, num_layers)
    result = {
        "model": name or getattr(base_model.config, "_name_or_path", "") or type(base_model).__name__,
        "model_type": base_model.config.model_type,
        "num_layers": num_layers,
        "split": {
            "encoder_layers": choice.encoder_layers,
            "decoder_layers": choice.decoder_layers,
            "reasoning_layers": list(choice.reasoning_layers),
        },
        "reasons": choice.reasons,
        "constraints": asdict(constraints) | {"min_reasoning_layers": constraints.reasoning_floor(num_layers)},
        "calibration": {"source": source, "tokens": len(ids), "windows": len(windows), "window": window,
                        "measured_positions": metrics.pop("tokens"), "lens_positions": metrics.pop("lens_tokens")},
        "metrics": metrics,
        "change_score": choice.change_score,
        "top_candidates": choice.candidates,
        "algorithm": "three-segment change-point fit of the per-layer change score, plateau in the middle "
        "(loopus.dynamics.choose_split)",
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "split.json").write_text(json.dumps(result, indent=2))
        plot_dynamics(metrics, choice, out / "dynamics.png", title=str(result["model"]))
        result["files"] = [str(out / "split.json"), str(out / "dynamics.png")]
    return result


# -- a split given as "auto", a split.json or a pair -----------------------------------------------------


SplitSpec = str | os.PathLike | tuple[int, int] | list[int]


def resolve_split(
    base_model: torch.nn.Module,
    split: SplitSpec,
    tokenizer: Any = None,
    *,
    data: str | os.PathLike | None = None,
    calibration: str | os.PathLike | None = None,
    calibration_tokens: int = CALIBRATION_TOKENS,
    constraints: SplitConstraints | None = None,
) -> tuple[int, int, dict[str, Any] | None]:
    """(encoder, decoder, analysis) for `split`: "auto" (`analyze` on calibration text; the analysis is
    returned), a split.json path (or its directory) or an (encoder, decoder) pair (analysis None).
    `convert` checks the counts; nothing here rounds them."""
    if isinstance(split, (tuple, list)):
        if len(split) != 2:
            raise SplitError(f"split must be 'auto', a split.json path or (encoder, decoder), got {split!r}")
        return split[0], split[1], None
    if isinstance(split, str) and split == "auto":
        if tokenizer is None:
            source = getattr(base_model.config, "_name_or_path", "")
            if not (source and os.path.isdir(source)):
                raise ValueError("split='auto' runs the base model on calibration text: pass tokenizer=")
            tokenizer = AutoTokenizer.from_pretrained(source)
        analysis = analyze(base_model, tokenizer, data=data, calibration=calibration, tokens=calibration_tokens,
                           constraints=constraints, progress=False)
        return analysis["split"]["encoder_layers"], analysis["split"]["decoder_layers"], analysis
    if isinstance(split, (str, os.PathLike)):
        return *load_split(split), None
    raise SplitError(f"split must be 'auto', a split.json path or (encoder, decoder), got {split!r}")


def convert_auto(
    base_model: Any,
    split: SplitSpec = "auto",
    tokenizer: Any = None,
    *,
    data: str | os.PathLike | None = None,
    calibration: str | os.PathLike | None = None,
    calibration_tokens: int = CALIBRATION_TOKENS,
    constraints: SplitConstraints | None = None,
    **options: Any,
) -> LoopUSForCausalLM:
    """`convert` with the split from `resolve_split`; an automatic choice is kept as `model.split_analysis`.

    `base_model` is a model or anything `loopus.zoo.load_base` accepts; `options` are `convert`'s."""
    if not isinstance(base_model, torch.nn.Module):
        base_model, loaded = load_base(base_model)
        tokenizer = tokenizer if tokenizer is not None else loaded
    encoder, decoder, analysis = resolve_split(base_model, split, tokenizer, data=data, calibration=calibration,
                                               calibration_tokens=calibration_tokens, constraints=constraints)
    model = convert(base_model, encoder, decoder, **options)
    model.split_analysis = analysis
    return model

