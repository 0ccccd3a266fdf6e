"""The random-deep-supervision (RDS) objective and the dense baseline step.

Per batch (DESIGN.md section 1, item 3):

1. sample a horizon T ~ U{horizon_min..horizon_max} (or, with `horizon_dist="poisson_lognormal"`, from a
   wide draw whose mean ramps up over the run, see `draw_horizon`) and a set S of |S| supervised steps
   in 1..T (|S| ~ U{supervised_min..supervised_max}, capped at T; T itself is always in S by default);
2. run the encoder once and the reasoning block T times; loop steps outside every gradient window
   run under `torch.no_grad()`;
3. before each supervised step t the incoming state is detached and the k = `grad_steps` steps
   t-k+1..t run with gradient (the window never reaches back past the previous supervised step);
   the decoder loss at h_t is computed with a chunked cross entropy and `backward()` is called at
   once, so the autograd graph of step t is freed before step t+1 runs. Peak memory is therefore
   that of one k-step window plus the decoder, whatever T is;
4. gradients accumulate over S (each term is divided by |S|); the caller takes one optimiser step.

Losses at a supervised step t (prev = the previous supervised step):

    L_LM(t)   = mean next-token cross entropy of the decoder at h_t
    L_mono(t) = relu(L_LM(t) - L_LM(prev).detach())    (0 at the first supervised step)
    L_Q       = mean over t in S (except the deepest) of BCE(q_t, y_t)
    L_KL      = mean over tokens of KL(p_base || p_1)       (loop 1 only, with a reference model)
    total     = sum_t (L_LM(t) + beta * L_mono(t)) / |S|  +  kl * L_KL / |S|  +  lambda * L_Q

**Keeping the base.** `reference` is a frozen copy of the model before training; its loop-1
distribution is the base model's. The KL term pulls the trained model's one-loop prediction toward
it, so continued training on a narrow corpus does not wash out what the base knew.

**The confidence target.** At inference a token leaves the loop when its confidence q_t passes a
threshold, and from then on its prediction is the one made from h_t. Exiting is *useful* when it
saves loops without changing the outcome, so the head is trained to answer exactly that question:

    y_t = 1  iff  argmax logits_t == argmax logits_ref   and   nll_t <= nll_ref + margin

where `ref` is the deepest supervised step of the batch (T by default): "stopping here emits the same
token as running the whole horizon, and costs at most `margin` nats of the label's likelihood".
It is computed from detached decoder outputs (no gradient flows into the target). Why not the
common `1[argmax logits_t == label]`? That target teaches "this token is easy": a token the model
gets wrong at every depth gets y = 0 at every depth and would loop to the budget for nothing, while
a token that is right at t but would become *more* certain later is told to stop. The convergence
target above makes exit free for hopeless tokens and for tokens whose prediction has settled,
and keeps looping exactly where more loops still change the answer or the loss.

The head reads the same gated state h_t that it reads at inference (`confidence_head.logits(h_t)`),
detached: L_Q trains the head only and does not pull the representation toward being easy to
score. Only detached (batch, seq, hidden) states of the |S| supervised steps are kept until the end
of the horizon, so this too is independent of T.

**Chunked cross entropy.** The vocabulary can be 262k entries: full fp32 logits for a 4 x 512 batch
would take 2 GiB, plus as much again for their gradient. `chunked_cross_entropy` computes logits
`ce_chunk` positions at a time inside `torch.utils.checkpoint`, so only one chunk's logits exist at
once, in the forward and (recomputed) in the backward.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..looped import LoopedModel, looped_view
from ..text import IGNORE_INDEX
from .options import Section, need_at_least, option, parse_floats
from .recipes import DEFAULT

CE_CHUNK = 256  # positions per cross-entropy chunk: caps the live logits
HORIZON_DISTS = ("uniform", "poisson_lognormal")


@dataclass(frozen=True)
class RDSConfig(Section):
    """The objective: how plans are drawn (T, S, k) and the weights of the loss terms."""

    horizon_min: int = option(DEFAULT["horizon_min"], "smallest sampled horizon T")
    horizon_max: int = option(DEFAULT["horizon_max"], "largest sampled horizon T")
    supervised_min: int = option(DEFAULT["supervised_min"], "fewest supervised steps |S| (capped at T)")
    supervised_max: int = option(DEFAULT["supervised_max"], "most supervised steps |S|")
    grad_steps: int = option(DEFAULT["grad_steps"], "k: loop steps with gradient before each supervised step")
    supervise_last: bool = option(DEFAULT["supervise_last"], "always supervise step T (the confidence target "
                                  "needs the final state)")
    supervise_first: bool = option(DEFAULT["supervise_first"], "always supervise loop 1 (keeps the one-loop model "
                                   "trained every batch)")
    beta_mono: float = option(DEFAULT["beta_mono"], "weight of the monotonicity loss")
    lambda_conf: float = option(DEFAULT["lambda_conf"], "weight of the confidence loss")
    conf_margin: float = option(DEFAULT["conf_margin"], "nats an early exit may cost and still count as safe")
    kl_base: float = option(DEFAULT["kl_base"], "weight of KL(base model || loop 1) (needs --supervise-first true)")
    ce_chunk: int = option(CE_CHUNK, "positions per cross-entropy chunk (caps live logits)")
    horizon_dist: str = option(DEFAULT["horizon_dist"], "how T is drawn: uniform on [horizon_min, horizon_max], "
                               "or poisson_lognormal around a mean that ramps up over the run",
                               choices=HORIZON_DISTS)
    horizon_mean: float = option(DEFAULT["horizon_mean"], "poisson_lognormal: the mean of T once the ramp is over")
    horizon_ramp: tuple[float, float] = option(DEFAULT["horizon_ramp"], "poisson_lognormal: the fractions of the "
                                               "run between which the mean of T rises from horizon_min to "
                                               "horizon_mean", parse=parse_floats)

    def check(self) -> None:
        if not 1 <= self.horizon_min <= self.horizon_max:
            raise ValueError(f"need 1 <= horizon_min <= horizon_max, got {self.horizon_min}, {self.horizon_max}")
        if not 1 <= self.supervised_min <= self.supervised_max:
            raise ValueError(
                f"need 1 <= supervised_min <= supervised_max, got {self.supervised_min}, {self.supervised_max}"
            )
        need_at_least(self, ("grad_steps", "ce_chunk"), 1)
        if self.kl_base < 0:
            raise ValueError(f"kl_base must be >= 0, got {self.kl_base}")
        if self.horizon_dist not in HORIZON_DISTS:
            raise ValueError(f"horizon_dist must be one of {HORIZON_DISTS}, got {self.horizon_dist!r}")
        if self.horizon_dist == "poisson_lognormal":
            if not self.horizon_min <= self.horizon_mean <= self.horizon_max:
                raise ValueError(f"need horizon_min <= horizon_mean <= horizon_max, got {self.horizon_min}, "
                                 f"{self.horizon_mean}, {self.horizon_max}")
            if len(self.horizon_ramp) != 2 or not 0.0 <= self.horizon_ramp[0] <= self.horizon_ramp[1] <= 1.0:
                raise ValueError(f"horizon_ramp must be two fractions START,END with 0 <= START <= END <= 1, got "
                                 f"{','.join(str(x) for x in self.horizon_ramp)}")
        if self.kl_base > 0 and not self.supervise_first:
            raise ValueError("--kl-base is a loop-1 term: it needs --mode loopus and --supervise-first true")


# a model with one loop (dense training) runs this plan: loop 1, supervised
ONE_LOOP = dict(horizon_min=1, horizon_max=1, supervised_min=1, supervised_max=1)


@dataclass(frozen=True)
class RDSPlan:
    """Horizon T and supervised steps S (1-based, sorted), with k gradient steps per supervised step."""

    horizon: int
    supervised: tuple[int, ...]
    grad_steps: int = 1

    def __post_init__(self) -> None:
        if self.horizon < 1 or not self.supervised:
            raise ValueError(f"bad plan: horizon {self.horizon}, supervised {self.supervised}")
        if list(self.supervised) != sorted(set(self.supervised)) or not 1 <= self.supervised[0] <= self.supervised[-1] <= self.horizon:
            raise ValueError(f"supervised steps {self.supervised} must be distinct, sorted and in 1..{self.horizon}")

    def window_starts(self) -> dict[int, int]:
        """For each supervised step t, the first loop step of its gradient window."""
        starts, previous = {}, 0
        for t in self.supervised:
            starts[t] = max(t - self.grad_steps + 1, previous + 1)
            previous = t
        return starts

    def grad_mask(self) -> list[bool]:
        """Per loop step 1..T: does it run with gradient?"""
        mask = [False] * (self.horizon + 1)
        for t, start in self.window_starts().items():
            for s in range(start, t + 1):
                mask[s] = True
        return mask[1:]


LOGNORMAL_SIGMA = 0.5  # spread of the log-rate in the Poisson-lognormal draw (McLeish et al. 2025)


def horizon_mean_at(cfg: RDSConfig, progress: float) -> float:
    """The mean of the horizon draw at `progress` (0..1) through the run: horizon_min before the ramp,
    horizon_mean after it, linear in between."""
    start, end = cfg.horizon_ramp
    share = 1.0 if progress >= end else 0.0 if progress <= start else (progress - start) / (end - start)
    return cfg.horizon_min + share * (cfg.horizon_mean - cfg.horizon_min)


def draw_horizon(generator: torch.Generator, cfg: RDSConfig, progress: float = 1.0) -> int:
    """T for one batch. `uniform`: U{horizon_min..horizon_max}. `poisson_lognormal` (McLeish et al. 2025):
    T = horizon_min + Poisson(exp(tau)), tau ~ N(log r - sigma^2 / 2, sigma), r = mean - horizon_min, clipped to
    horizon_max: a heavy right tail, so that the loop is often run far deeper than the mean, and a mean
    that ramps up over the run, so that the model meets deep loops once the shallow ones work."""
    if cfg.horizon_dist == "uniform":
        return int(torch.randint(cfg.horizon_min, cfg.horizon_max + 1, (1,), generator=generator))
    rate = horizon_mean_at(cfg, progress) - cfg.horizon_min
    if rate <= 0:
        return cfg.horizon_min
    tau = torch.normal(torch.tensor([math.log(rate) - LOGNORMAL_SIGMA**2 / 2]), LOGNORMAL_SIGMA, generator=generator)
    extra = int(torch.poisson(tau.exp(), generator=generator))
    return min(cfg.horizon_min + extra, cfg.horizon_max)


def sample_plan(generator: torch.Generator, cfg: RDSConfig = RDSConfig(), progress: float = 1.0) -> RDSPlan:
    """Draw T and S from `generator` (a dedicated generator makes the draw reproducible on resume);
    `progress` (the share of the run done) sets the mean of a ramped horizon draw.

    `supervise_last` / `supervise_first` put step T / step 1 in S every time; the rest of S is drawn
    from the other steps. Supervising loop 1 every batch keeps the one-loop model (the base model at
    initialisation) trained on every batch, instead of only when the draw happens to reach it.
    """
    horizon = draw_horizon(generator, cfg, progress)
    count = int(torch.randint(cfg.supervised_min, cfg.supervised_max + 1, (1,), generator=generator))
    count = min(count, horizon)
    fixed = {horizon} if cfg.supervise_last else set()
    if cfg.supervise_first:
        fixed.add(1)
    pool = [s for s in range(1, horizon + 1) if s not in fixed]
    drawn = torch.randperm(len(pool), generator=generator)[: max(0, count - len(fixed))]
    steps = sorted(fixed | {pool[int(i)] for i in drawn})
    return RDSPlan(horizon, tuple(steps), cfg.grad_steps)


@dataclass
class ChunkedCE:
    loss_sum: torch.Tensor   # sum of per-token NLL over the valid positions (differentiable)
    count: int               # number of valid positions
    nll: torch.Tensor        # (count,) per-token NLL, detached
    pred: torch.Tensor       # (count,) argmax token per valid position
    valid: torch.Tensor      # (batch, seq) bool mask of the positions scored
    kl_sum: torch.Tensor | None = None  # sum of per-token KL(reference || model), with `reference`


# fn(hidden rows, targets, logits_fn) -> (summed NLL, per-token NLL detached, argmax): a fused projection + cross
# entropy (e.g. a GPU kernel) that replaces the chunks where it is given; no reference term.
ChunkLoss = Callable[[torch.Tensor, torch.Tensor, Callable], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def chunked_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    chunk: int = CE_CHUNK,
    reference: tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    fused: ChunkLoss | None = None,
) -> ChunkedCE:
    """Next-token CE of `hidden` (batch, seq, hidden; already aligned with `labels`) without full logits.

    Each chunk of `chunk` positions is projected to the vocabulary inside a non-reentrant
    checkpoint: in the forward only its loss, NLLs and argmax survive; in the backward its logits
    are recomputed one chunk at a time. Positions labelled IGNORE_INDEX (-100) are skipped entirely. With
    `reference` = (hidden states of a reference model, its logits function), the KL divergence
    KL(reference || model) per position is summed too, chunk by chunk in the same way. A `fused` loss
    computes the labelled rows in one call instead of the chunks (not with a reference: the KL needs logits).
    """
    valid = labels != IGNORE_INDEX
    flat = hidden[valid]
    targets = labels[valid]
    ref_flat = reference[0][valid].detach() if reference is not None else None
    needs_grad = torch.is_grad_enabled() and flat.requires_grad
    if fused is not None and reference is None and flat.shape[0]:
        loss_sum, nll, pred = fused(flat, targets, logits_fn)
        return ChunkedCE(loss_sum, int(flat.shape[0]), nll, pred, valid)

    def piece(h: torch.Tensor, y: torch.Tensor, r: torch.Tensor | None):
        logits = logits_fn(h).float()
        nll = F.cross_entropy(logits, y, reduction="none")
        if r is None:
            return nll.sum(), nll.detach(), logits.argmax(-1)
        with torch.no_grad():
            ref_logprobs = torch.log_softmax(reference[1](r).float(), dim=-1)
        kl = F.kl_div(torch.log_softmax(logits, dim=-1), ref_logprobs, log_target=True, reduction="sum")
        return nll.sum(), nll.detach(), logits.argmax(-1), kl

    sums, nlls, preds, kls = [], [], [], []
    for start in range(0, flat.shape[0], chunk):
        h, y = flat[start : start + chunk], targets[start : start + chunk]
        r = ref_flat[start : start + chunk] if ref_flat is not None else None
        if needs_grad:
            out = checkpoint(piece, h, y, r, use_reentrant=False)
        else:
            out = piece(h, y, r)
        sums.append(out[0])
        nlls.append(out[1])
        preds.append(out[2])
        kls.extend(out[3:])
    if not sums:
        zero = hidden.sum() * 0.0
        empty = torch.zeros(0, device=hidden.device)
        return ChunkedCE(zero, 0, empty, empty.long(), valid, zero if reference is not None else None)
    kl_sum = torch.stack(kls).sum() if kls else None
    return ChunkedCE(torch.stack(sums).sum(), int(flat.shape[0]), torch.cat(nlls), torch.cat(preds), valid, kl_sum)


@torch.no_grad()
def confidence_targets(
    nll: torch.Tensor, pred: torch.Tensor, ref_nll: torch.Tensor, ref_pred: torch.Tensor, margin: float
) -> torch.Tensor:
    """y = 1 where stopping now emits the same token as the reference depth and loses <= margin nats."""
    return ((pred == ref_pred) & (nll <= ref_nll + margin)).float()


def one_loop_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states of a LoopUS model at one loop (the base model, before training)."""
    return next(model.per_loop_hidden(input_ids, [1]))[2]


def _any_grad(modules) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())


def rds_step(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    plan: RDSPlan,
    cfg: RDSConfig = RDSConfig(),
    *,
    loss_scale: float = 1.0,
    backward: Callable[[torch.Tensor], None] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    reference=None,
    fused: ChunkLoss | None = None,
) -> dict[str, float]:
    """One batch of random deep supervision on a looped model (`loopus.looped`; a plain causal LM runs as
    one loop); calls backward per supervised step.

    `labels` are aligned with `input_ids` (position i predicts labels[i]); IGNORE_INDEX is ignored.
    `loss_scale` multiplies every backward (e.g. 1 / gradient-accumulation steps). With a frozen
    `reference` model (the LoopUS model before training) and `cfg.kl_base > 0`, loop 1's loss adds
    `kl_base` x KL(reference's loop 1 || loop 1) when loop 1 is supervised. `fused`: a fused projection +
    cross entropy for the supervised steps (see `chunked_cross_entropy`).
    Returns detached metrics: `lm@t` per supervised step, `kl@1`, `mono`, `conf`, `conf_target`, `horizon`.
    """
    model: LoopedModel = looped_view(model)
    backward = backward or (lambda loss: loss.backward())
    supervised = set(plan.supervised)
    starts = set(plan.window_starts().values())
    grad_mask = plan.grad_mask()
    front_trainable = grad_mask[0] and _any_grad(model.front_modules())

    metrics: dict[str, float] = {"horizon": float(plan.horizon)}
    records = []  # (detached state, nll, pred) per supervised step, for the confidence loss
    previous_lm = None
    mono_total = 0.0
    with autocast():
        with torch.set_grad_enabled(front_trainable):
            embeds = model.embed(input_ids)
            ctx = model.layer_context(embeds, None, None, None)
            state = model.encode(embeds, ctx)
            if getattr(ctx, "anchor", None) is not None:
                # the input injection reads h_0 without gradient: each supervised step's backward frees the
                # encoder's graph, so the encoder learns through loop 1's path only
                ctx.anchor = ctx.anchor.detach()
        # pass by pass through `loop_step`, not `run_loop`: each pass sets its own grad mode and detach point
        for t in range(1, plan.horizon + 1):
            if t in starts and not (t == 1 and front_trainable):
                state = state.detach()
            with torch.set_grad_enabled(grad_mask[t - 1]):
                state, _ = model.loop_step(state, ctx, t - 1)
            if t not in supervised:
                continue
            hidden = model.decode(state, ctx)
            ref = None
            if t == 1 and reference is not None and cfg.kl_base > 0:
                with torch.no_grad():
                    ref = (one_loop_hidden(reference, input_ids), reference.lm_logits)
            ce = chunked_cross_entropy(hidden, labels, model.lm_logits, cfg.ce_chunk, ref, fused)
            lm = ce.loss_sum / max(ce.count, 1)
            mono = torch.relu(lm - previous_lm) if previous_lm is not None else lm.new_zeros(())
            loss = lm + cfg.beta_mono * mono
            if ce.kl_sum is not None:
                kl = ce.kl_sum / max(ce.count, 1)
                loss = loss + cfg.kl_base * kl
                metrics["kl@1"] = float(kl.detach())
            loss = loss / len(supervised)
            if loss.requires_grad:
                backward(loss * loss_scale)
            previous_lm = lm.detach()
            mono_total += float(mono.detach())
            metrics[f"lm@{t}"] = float(previous_lm)
            if not torch.isfinite(previous_lm):
                metrics["nonfinite"] = 1.0
            records.append((state.detach(), ce.nll, ce.pred, ce.valid))
            state = state.detach()
        metrics["mono"] = mono_total / len(supervised)

        if len(records) > 1:
            head_trainable = cfg.lambda_conf > 0 and _any_grad([model.confidence_head])
            _, ref_nll, ref_pred, _ = records[-1]
            bce_terms, target_rate = [], []
            for state_t, nll, pred, valid in records[:-1]:
                target = confidence_targets(nll, pred, ref_nll, ref_pred, cfg.conf_margin)
                with torch.set_grad_enabled(head_trainable):
                    logit = model.confidence_head.logits(state_t)[valid]
                bce_terms.append(F.binary_cross_entropy_with_logits(logit, target))
                target_rate.append(float(target.mean()) if target.numel() else 0.0)
            conf_loss = torch.stack(bce_terms).mean()
            if head_trainable and conf_loss.requires_grad:
                backward(cfg.lambda_conf * conf_loss * loss_scale)
            metrics["conf"] = float(conf_loss.detach())
            metrics["conf_target"] = sum(target_rate) / len(target_rate)
            if not torch.isfinite(conf_loss.detach()):
                metrics["nonfinite"] = 1.0
    metrics["lm"] = sum(v for k, v in metrics.items() if k.startswith("lm@")) / len(supervised)
    return metrics


def dense_step(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    ce_chunk: int = CE_CHUNK,
    loss_scale: float = 1.0,
    backward: Callable[[torch.Tensor], None] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """Plain continued training of an (unlooped) causal LM on the same packed batch: its one loop, supervised."""
    return rds_step(model, input_ids, labels, RDSPlan(1, (1,)), RDSConfig(**ONE_LOOP, ce_chunk=ce_chunk),
                    loss_scale=loss_scale, backward=backward, autocast=autocast)
