"""The encoder / reasoning / decoder split implied by per-layer change signals, and split.json.

Pure numpy: `choose_split` reads curves measured by `loopus.dynamics.measure_dynamics` (or any with the
same names) and returns a `SplitChoice`; see its docstring for the algorithm. `load_split` reads the
(encoder, decoder) counts back from a split.json written by `loopus.dynamics.analyze`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import SplitError

# Change signals the split algorithm can read (see `change_signals`); DEFAULT_SIGNALS is what it reads
# unless told otherwise.
ALL_SIGNALS = ("cka", "angle", "relative_update", "lens_step_kl")
DEFAULT_SIGNALS = ("cka",)


@dataclass
class SplitConstraints:
    """Limits on the split. `min_reasoning` may be a count (>= 1) or a share of the layers (< 1)."""

    min_encoder: int = 1
    min_decoder: int = 1
    min_reasoning: float = 0.5
    max_encoder: int | None = None
    max_decoder: int | None = None

    def reasoning_floor(self, num_layers: int) -> int:
        """The fewest reasoning layers allowed (>= 1) for a model of `num_layers` layers."""
        if self.min_reasoning < 1:
            return max(2, math.ceil(self.min_reasoning * num_layers))
        return int(self.min_reasoning)

    def validate(self, num_layers: int) -> None:
        """Raise `SplitError` unless some split of `num_layers` layers meets these limits.

        Needs no measurement, so `analyze` calls it before the slow part. When it passes,
        (min_encoder, min_decoder) is an allowed split.
        """
        for name in ("min_encoder", "min_decoder"):
            if getattr(self, name) < 0:
                raise SplitError(f"{name} must be >= 0, got {getattr(self, name)}")
        if num_layers < 3:
            raise SplitError(
                f"a model with {num_layers} layer(s) cannot be split into encoder, reasoning block and decoder: "
                "at least 3 layers are needed"
            )
        floor = self.reasoning_floor(num_layers)
        need = self.min_encoder + self.min_decoder + floor
        if need > num_layers:
            raise SplitError(
                f"constraints cannot be met: min_encoder {self.min_encoder} + min_reasoning {floor} + "
                f"min_decoder {self.min_decoder} = {need} layers, but the model has {num_layers}"
            )
        if (self.max_encoder is not None and self.max_encoder < self.min_encoder) or (
            self.max_decoder is not None and self.max_decoder < self.min_decoder
        ):
            raise SplitError("constraints cannot be met: a max_encoder/max_decoder is below its minimum")


@dataclass
class SplitChoice:
    """A chosen split, the reasons for it, the best-ranked candidates and the change score it was read from."""

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
    constraints.validate(L)
    floor = constraints.reasoning_floor(L)
    max_e = L if constraints.max_encoder is None else constraints.max_encoder
    max_d = L if constraints.max_decoder is None else constraints.max_decoder

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


def load_split(path: str | os.PathLike) -> tuple[int, int]:
    """(encoder, decoder) from a split.json written by `loopus.dynamics.analyze` (a file or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "split.json"
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found (run `loopus analyze` first)")
    try:
        split = json.loads(path.read_text())["split"]
        counts = split["encoder_layers"], split["decoder_layers"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a split.json written by loopus analyze ({err})") from None
    if any(isinstance(c, bool) or not isinstance(c, int) for c in counts):
        raise SplitError(f"{path}: encoder_layers and decoder_layers must be layer counts (integers), got {counts}")
    return counts


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
