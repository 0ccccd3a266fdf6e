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

`choose_split` turns the curves into (encoder, decoder) layer counts; see its docstring for the
algorithm. `analyze` is both steps plus `split.json` and the PNG, as used by `loopus analyze`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .config import SplitError

DEFAULT_CALIBRATION = ("enwiki/valid.jsonl", "wikitext2/tokenized/valid.txt", "eltec_eng/valid.jsonl")
METRICS = ("cosine", "relative_update", "cka", "lens_kl", "lens_step_kl", "lens_top1")
# Change signals the split algorithm can read (see `change_signals`); DEFAULT_SIGNALS is what it reads
# unless told otherwise.
ALL_SIGNALS = ("cka", "angle", "relative_update", "lens_step_kl")
DEFAULT_SIGNALS = ("cka",)


# -- calibration text -------------------------------------------------------------------------------


def _read_texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        from .train.data import read_jsonl_texts

        return list(read_jsonl_texts(path, "text"))
    return [path.read_text(encoding="utf-8")]


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
    from .paths import data_path

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
    for text in _read_texts(path):
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
    logits = model.lm_head(model.model.norm(hidden)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


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


def _token_windows(ids: list[int], bos: int | None, window: int) -> list[list[int]]:
    body = window - (1 if bos is not None else 0)
    out = []
    for start in range(0, len(ids), body):
        chunk = ids[start : start + body]
        if len(chunk) < 2:
            break
        out.append(([bos] if bos is not None else []) + chunk)
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
    from tqdm.auto import tqdm

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


# -- choosing the split --------------------------------------------------------------------------------


@dataclass
class SplitConstraints:
    """Limits on the split. `min_reasoning` may be a count (>= 1) or a share of the layers (< 1)."""

    min_encoder: int = 1
    min_decoder: int = 1
    min_reasoning: float = 0.5
    max_encoder: int | None = None
    max_decoder: int | None = None

    def reasoning_floor(self, num_layers: int) -> int:
        if self.min_reasoning < 1:
            return max(2, math.ceil(self.min_reasoning * num_layers))
        return int(self.min_reasoning)


@dataclass
class SplitChoice:
    encoder_layers: int
    decoder_layers: int
    num_layers: int
    score: float
    reasons: list[str] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    change_score: list[float] = field(default_factory=list)

    @property
    def reasoning_layers(self) -> tuple[int, int]:
        """First and last base-layer index of the reasoning block (inclusive)."""
        return self.encoder_layers, self.num_layers - self.decoder_layers - 1

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["reasoning_layers"] = list(self.reasoning_layers)
        return out


def change_signals(
    metrics: dict[str, Sequence[float]], signals: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Per-layer change signals, oriented so that larger = the layer transforms the state more.

    Available: "cka" (1 - linear CKA of h_l and h_l+1), "angle" (arccos of the cosine, degrees),
    "relative_update", "lens_step_kl". `signals=None` takes `DEFAULT_SIGNALS` that were measured.
    """
    available = {}
    if "cka" in metrics:
        available["cka"] = 1.0 - np.asarray(metrics["cka"], dtype=float)
    if "cosine" in metrics:
        available["angle"] = np.degrees(np.arccos(np.clip(np.asarray(metrics["cosine"], dtype=float), -1.0, 1.0)))
    for name in ("relative_update", "lens_step_kl"):
        if name in metrics:
            available[name] = np.asarray(metrics[name], dtype=float)
    unknown = sorted(set(signals or ()) - set(ALL_SIGNALS))
    if unknown:
        raise ValueError(f"unknown change signal(s) {unknown}; choose from {', '.join(ALL_SIGNALS)}")
    wanted = list(signals) if signals else [s for s in DEFAULT_SIGNALS if s in available] or list(available)
    missing = [s for s in wanted if s not in available]
    if missing or not wanted:
        raise ValueError(f"metrics lack the change signal(s) {missing or list(ALL_SIGNALS)}; have {sorted(metrics)}")
    return {name: available[name] for name in wanted}


def change_score(metrics: dict[str, Sequence[float]], signals: Sequence[str] | None = None) -> np.ndarray:
    """One robustly normalised per-layer change score: the mean over signals of log(signal / median)."""
    scores = []
    for values in change_signals(metrics, signals).values():
        values = np.maximum(values, 1e-9)
        scores.append(np.log(values / np.median(values)))
    return np.mean(scores, axis=0)


def choose_split(
    metrics: dict[str, Sequence[float]],
    constraints: SplitConstraints | None = None,
    num_layers: int | None = None,
    signals: Sequence[str] | None = None,
) -> SplitChoice:
    """Choose (encoder, decoder) layer counts from per-layer change signals.

    Algorithm (three-stage change-point detection with constraints):
      1. Per layer, a change score c_l = mean over signals of log(signal_l / median(signal)). The default
         signal is 1 - CKA(h_l, h_l+1) (`DEFAULT_SIGNALS`): it measures how much a layer rearranges the
         token geometry and, unlike the cosine and the relative update norm, it is blind to the growth of
         the residual-stream norm (x1400 across Gemma 3 270M) and to the sliding/global attention
         alternation, which dominate those curves. `signals=` picks others ("angle", "relative_update",
         "lens_step_kl"). Logs make the score scale-free; the median makes "typical" = 0.
      2. Every split (e, d) allowed by the constraints (min/max encoder and decoder sizes, a minimum
         reasoning-block size) is scored by a piecewise-constant fit of c with three segments
         [0, e), [e, L-d), [L-d, L): the score is the residual sum of squares, so change points land
         where the level of c jumps.
      3. Only splits whose middle segment is a plateau count: its mean change must be below both outer
         segments' means (encoder and decoder transform more than the loop). If none qualifies, the
         best fit is taken and the reasons say so.
      4. Splits within 2% of the best cost are near-ties: a boundary layer half-way between plateau and
         transformation could go either way. It is kept out of the loop (the shortest reasoning block among
         the near-ties wins): looping a layer that rewrites the state costs more than losing it from the
         loop. On Gemma 3 270M this is what separates decoder 3 (good) from decoder 2 (poor), see
         docs/results/issue5.md.
    Raises `SplitError` when the model has too few layers or the constraints cannot be met.
    """
    constraints = constraints or SplitConstraints()
    c = change_score(metrics, signals)
    L = len(c) if num_layers is None else int(num_layers)
    if len(c) != L:
        raise ValueError(f"metrics have {len(c)} layers, the model {L}")
    floor = constraints.reasoning_floor(L)
    for name in ("min_encoder", "min_decoder"):
        if getattr(constraints, name) < 0:
            raise SplitError(f"{name} must be >= 0, got {getattr(constraints, name)}")
    if floor < 1:
        raise SplitError(f"min_reasoning must leave at least 1 layer, got {constraints.min_reasoning}")
    if L < 3:
        raise SplitError(
            f"a model with {L} layer(s) cannot be split into encoder, reasoning block and decoder: "
            "at least 3 layers are needed"
        )
    need = constraints.min_encoder + constraints.min_decoder + floor
    if need > L:
        raise SplitError(
            f"constraints cannot be met: min_encoder {constraints.min_encoder} + min_reasoning {floor} + "
            f"min_decoder {constraints.min_decoder} = {need} layers, but the model has {L}"
        )
    max_e = L if constraints.max_encoder is None else constraints.max_encoder
    max_d = L if constraints.max_decoder is None else constraints.max_decoder
    if max_e < constraints.min_encoder or max_d < constraints.min_decoder:
        raise SplitError("constraints cannot be met: a max_encoder/max_decoder is below its minimum")

    prefix = np.concatenate([[0.0], np.cumsum(c)])
    prefix2 = np.concatenate([[0.0], np.cumsum(c * c)])

    def sse(lo: int, hi: int) -> tuple[float, float]:
        n = hi - lo
        if n == 0:
            return 0.0, 0.0
        s, s2 = prefix[hi] - prefix[lo], prefix2[hi] - prefix2[lo]
        return s2 - s * s / n, s / n

    candidates = []
    for e in range(constraints.min_encoder, min(max_e, L) + 1):
        for d in range(constraints.min_decoder, min(max_d, L) + 1):
            if L - e - d < floor:
                continue
            cost_e, mean_e = sse(0, e)
            cost_r, mean_r = sse(e, L - d)
            cost_d, mean_d = sse(L - d, L)
            plateau = (e == 0 or mean_r < mean_e) and (d == 0 or mean_r < mean_d)
            candidates.append(
                {
                    "encoder_layers": e,
                    "decoder_layers": d,
                    "cost": float(cost_e + cost_r + cost_d),
                    "plateau": bool(plateau),
                    "means": [float(mean_e), float(mean_r), float(mean_d)],
                }
            )
    if not candidates:
        raise SplitError("constraints cannot be met: no (encoder, decoder) pair satisfies them")
    pool = [cand for cand in candidates if cand["plateau"]]
    reasons = []
    if not pool:
        pool = candidates
        reasons.append(
            "no allowed split has a middle segment that changes less than both ends; the best three-segment "
            "fit is used anyway (the curves show no plateau)"
        )
    best_cost = min(cand["cost"] for cand in pool)
    scale = max(best_cost, 1e-9)
    tolerance = 0.02 * scale + 1e-9
    near = [cand for cand in pool if cand["cost"] <= best_cost + tolerance]
    # Near-ties mean a boundary layer is transitional (half-way between plateau and transformation). Such a
    # layer is kept out of the loop: looping a layer that rewrites the state costs more (each extra pass
    # drifts further) than losing it from the loop does. So the shortest reasoning block among them wins.
    chosen = min(near, key=lambda cand: (L - cand["encoder_layers"] - cand["decoder_layers"], cand["cost"]))
    e, d = chosen["encoder_layers"], chosen["decoder_layers"]
    mean_e, mean_r, mean_d = chosen["means"]
    used = ", ".join(change_signals(metrics, signals))
    reasons.insert(
        0,
        f"change score from {used}: encoder layers 0..{e - 1} mean {mean_e:+.2f}, reasoning layers "
        f"{e}..{L - d - 1} mean {mean_r:+.2f}, decoder layers {L - d}..{L - 1} mean {mean_d:+.2f} "
        "(log ratio to the median layer)",
    )
    reasons.append(
        f"chosen by a three-segment piecewise-constant fit (residual {chosen['cost']:.3f}) over "
        f"{len(candidates)} allowed splits; constraints: encoder >= {constraints.min_encoder}, "
        f"decoder >= {constraints.min_decoder}, reasoning >= {floor} layers"
    )
    if len(near) > 1:
        tied = ", ".join(f"({c['encoder_layers']}, {c['decoder_layers']})" for c in near)
        reasons.append(
            f"{len(near)} splits fit within 2% of the best, (encoder, decoder) = {tied}: the boundary layers are "
            "transitional and are kept out of the loop (the shortest reasoning block among them is taken)"
        )
    ranked = sorted(candidates, key=lambda cand: (not cand["plateau"], cand["cost"]))
    return SplitChoice(
        encoder_layers=e,
        decoder_layers=d,
        num_layers=L,
        score=chosen["cost"],
        reasons=reasons,
        candidates=ranked[:10],
        change_score=c.tolist(),
    )


# -- the plot ----------------------------------------------------------------------------------------


def plot_dynamics(
    metrics: dict[str, Any], choice: SplitChoice, path: str | os.PathLike, title: str = ""
) -> None:
    """Per-layer curves with the encoder / reasoning / decoder stages shaded, plus the layer-by-layer CKA map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = choice.num_layers
    x = np.arange(L)
    panels = [
        ("cosine", "cosine similarity cos(h_l, h_l+1)", False),
        ("relative_update", "relative update ||h_l+1 - h_l|| / ||h_l||", True),
        ("cka", "linear CKA(h_l, h_l+1)", False),
        ("lens_kl", "logit lens: KL(final || lens(h_l+1)), nats", True),
        ("lens_step_kl", "logit lens: KL(lens(h_l+1) || lens(h_l)), nats", True),
        ("lens_top1", "logit lens: top-1 agrees with final", False),
    ]
    panels = [p for p in panels if p[0] in metrics]
    fig = plt.figure(figsize=(15, 9.5))
    grid = fig.add_gridspec(3, 3, width_ratios=[1, 1, 1.05])
    e, d = choice.encoder_layers, choice.decoder_layers
    stages = [
        (-0.5, e - 0.5, "#f4a261", f"encoder ({e})"),
        (e - 0.5, L - d - 0.5, "#8ecae6", f"reasoning, looped ({L - e - d})"),
        (L - d - 0.5, L - 0.5, "#b5e48c", f"decoder ({d})"),
    ]

    def shade(ax):
        for lo, hi, colour, name in stages:
            if hi > lo:
                ax.axvspan(lo, hi, color=colour, alpha=0.35, label=name, lw=0)

    def curve(ax, values, label, logy):
        shade(ax)
        values = np.asarray(values, dtype=float)
        if logy and np.any(values > 0):
            values = np.where(values > 0, values, np.nan)  # a log axis leaves out exact zeros (the last lens KL)
            ax.set_yscale("log")
        ax.plot(x, values, marker="o", ms=3.5, color="#1d3557", lw=1.5)
        ax.set_title(label, fontsize=9.5)
        ax.grid(True, alpha=0.3)
        ax.set_xlim(-0.5, L - 0.5)
        ax.set_xticks(x if L <= 40 else x[:: max(1, L // 20)])
        ax.tick_params(labelsize=7.5)

    axes = [fig.add_subplot(grid[i // 2, i % 2]) for i in range(len(panels))]
    for ax, (key, label, logy) in zip(axes, panels):
        curve(ax, metrics[key], label, logy)
    for ax in axes[-2:]:
        ax.set_xlabel("layer l (transition h_l -> h_l+1)", fontsize=9)
    score_ax = fig.add_subplot(grid[0, 2])
    curve(score_ax, choice.change_score, "change score used for the split (log ratio to median)", False)
    score_ax.axhline(0, color="grey", lw=0.8)
    if "cka_matrix" in metrics:
        ax = fig.add_subplot(grid[1:, 2])
        matrix = np.asarray(metrics["cka_matrix"], dtype=float)
        image = ax.imshow(matrix, cmap="magma", vmin=0, vmax=1, origin="upper")
        for boundary in (e, L - d):
            ax.axhline(boundary, color="#00b4d8", lw=1.2, ls="--")
            ax.axvline(boundary, color="#00b4d8", lw=1.2, ls="--")
        ax.set_title("linear CKA between states h_i, h_j (dashed: loop input h_e, output h_L-d)", fontsize=9)
        ax.set_xlabel("state j (h_0 = embeddings)", fontsize=9)
        ax.set_ylabel("state i", fontsize=9)
        ticks = list(range(0, L + 1, 1 if L <= 20 else max(2, L // 10)))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=7.5)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=3, fontsize=10, frameon=False)
    fig.suptitle(
        f"{title}: staged representation dynamics. Split: encoder {e} / reasoning {L - e - d} / decoder {d}".strip(": "),
        x=0.01,
        ha="left",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- end to end ----------------------------------------------------------------------------------------


def analyze(
    base_model: Any,
    tokenizer: Any = None,
    *,
    data: str | os.PathLike | None = None,
    calibration: str | os.PathLike | None = None,
    tokens: int = 2048,
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
        from .zoo import load_base

        name = name or str(base_model)
        base_model, tokenizer = load_base(base_model)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to read calibration text")
    num_layers = len(_layers(base_model))
    constraints = constraints or SplitConstraints()
    # check the constraints before the (slow) measurement
    if num_layers < 3:
        raise SplitError(
            f"a model with {num_layers} layer(s) cannot be split into encoder, reasoning block and decoder: "
            "at least 3 layers are needed"
        )
    choose_split({"relative_update": [1.0] * num_layers}, constraints, num_layers)
    text, source = calibration_text(data, calibration, max_chars=tokens * 8)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    if len(ids) < 2:
        raise ValueError(f"calibration data {source} is empty: it gives {len(ids)} token(s)")
    windows = _token_windows(ids, tokenizer.bos_token_id, window)
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


def load_split(path: str | os.PathLike) -> tuple[int, int]:
    """(encoder, decoder) from a split.json written by `analyze` (a file or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "split.json"
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found (run `loopus analyze` first)")
    try:
        split = json.loads(path.read_text())["split"]
        return int(split["encoder_layers"]), int(split["decoder_layers"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a split.json written by loopus analyze ({err})") from None


def choice_from_result(result: dict[str, Any]) -> SplitChoice:
    """The `SplitChoice` recorded in a split.json dict (for re-plotting)."""
    split = result["split"]
    return SplitChoice(
        encoder_layers=split["encoder_layers"],
        decoder_layers=split["decoder_layers"],
        num_layers=result["num_layers"],
        score=float("nan"),
        reasons=list(result.get("reasons", [])),
        change_score=list(result.get("change_score", [])),
    )
