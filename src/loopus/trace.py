"""What the loop does to a prompt: state trajectories, gate mixing, step sizes and the thinking trace.

`trace_loops` runs a `LoopUSForCausalLM` on one prompt with its public pieces (`layer_context`,
`encode`, `loop_step`, `decode`, `lm_logits`) and records, per loop t = 1..B and per token:

    pca            2-D PCA of the loop states h_1 .. h_B of all tokens (unit-RMS; h_0 is projected too)
    gate           mean over channels of the gate's mixing share a_t (loop 2 on; loop 1 is ungated, a = 1)
    step           ||h_t - h_{t-1}|| / ||h_{t-1}||, the relative distance between successive states
    confidence     the confidence head's probability that no more loops are needed
    thinking trace the decoder's top next-token at every loop for every position (logit lens on h_t)

With one loop the model is exactly the base model, so the loop-1 column of the thinking trace is the
base model's own prediction. `write_trace` turns the result into trace.json, trace.png and trace.html.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .config import check_num_loops
from .plotting import pyplot, save_figure


def _token_text(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"#{token_id}"
    text = tokenizer.decode([int(token_id)])
    return text if text != "" else f"#{token_id}"


@torch.no_grad()
def trace_loops(
    model: Any,
    tokenizer: Any = None,
    prompt: str | None = None,
    *,
    input_ids: Sequence[int] | torch.Tensor | None = None,
    num_loops: int = 8,
    top_k: int = 3,
    pca_normalize: bool = True,
) -> dict[str, Any]:
    """Trace one prompt through `num_loops` loops of a LoopUS model (see the module docstring).

    Give `prompt` (tokenised with `tokenizer`, special tokens included) or `input_ids`. With
    `pca_normalize` (default) each state is scaled to unit RMS before the PCA, so the projection shows
    where states point rather than how their norm grows (residual norms grow several-fold per loop in
    an untrained model and would otherwise fill the first component).
    """
    check_num_loops(num_loops)
    if (prompt is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt or input_ids")
    if prompt is not None:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to trace a text prompt")
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0]
    else:
        ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("input_ids is empty")
    vocab = model.config.base_config.vocab_size
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ValueError(f"token ids must lie in 0..{vocab - 1}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        input_ids_t = ids.unsqueeze(0).to(device)
        embeds = model.get_input_embeddings()(input_ids_t)
        ctx = model.layer_context(embeds, None, None, None)
        state = model.encode(embeds, ctx)
        states = [state[0].float().cpu()]
        gates, confidences, top_ids, top_probs = [], [], [], []
        for step in model.run_loop(state, ctx, num_loops):
            state = step.state
            states.append(state[0].float().cpu())
            gates.append([1.0] * ids.numel() if step.gate is None else step.gate[0].float().mean(-1).cpu().tolist())
            confidences.append(model.confidence_head(state)[0].float().cpu().tolist())
            probs = torch.softmax(model.lm_logits(model.decode(state, ctx)).float()[0], -1)
            p, i = probs.topk(top_k, dim=-1)
            top_ids.append(i.cpu().tolist())
            top_probs.append(p.cpu().tolist())
    finally:
        model.train(was_training)

    seq = ids.numel()
    stacked = torch.stack(states)  # (loops + 1, seq, hidden)
    steps = [
        ((stacked[t] - stacked[t - 1]).norm(dim=-1) / stacked[t - 1].norm(dim=-1).clamp_min(1e-12)).tolist()
        for t in range(1, num_loops + 1)
    ]
    # PCA on all states, leaving out position 0 when it is BOS (an attention sink whose outsized norm
    # would take the first component to itself); that position is still projected.
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    fit_from = 1 if seq > 1 and bos is not None and int(ids[0]) == bos else 0
    points = stacked.double()
    if pca_normalize:
        points = points * torch.rsqrt(points.pow(2).mean(-1, keepdim=True).clamp_min(1e-12))
    # fitted on the loop states h_1..h_B: the first pass (h_0 -> h_1) is a jump so much larger than the
    # later refinements that it would take the first component to itself; h_0 is still projected.
    first_loop = 1 if num_loops >= 2 else 0
    fit = points[first_loop:, fit_from:].reshape(-1, points.shape[-1])
    mean = fit.mean(0)
    _, singular, vt = torch.linalg.svd(fit - mean, full_matrices=False)
    components = vt[:2]
    coords = ((points - mean) @ components.T).float()  # (loops + 1, seq, 2)
    variance = singular.pow(2)
    explained = (variance[:2] / variance.sum().clamp_min(1e-30)).tolist()

    tokens = [_token_text(tokenizer, t) for t in ids.tolist()]
    thinking = []
    for pos in range(seq):
        thinking.append(
            {
                "position": pos,
                "token": tokens[pos],
                "next_token_by_loop": [_token_text(tokenizer, top_ids[t][pos][0]) for t in range(num_loops)],
                "top_k_by_loop": [
                    [{"token": _token_text(tokenizer, i), "id": int(i), "prob": float(p)}
                     for i, p in zip(top_ids[t][pos], top_probs[t][pos])]
                    for t in range(num_loops)
                ],
            }
        )
    return {
        "prompt": prompt,
        "input_ids": ids.tolist(),
        "tokens": tokens,
        "num_loops": num_loops,
        "split": {
            "encoder_layers": model.config.encoder_layers,
            "decoder_layers": model.config.decoder_layers,
            "reasoning_layers": [model.config.reasoning_range.start, model.config.reasoning_range.stop - 1],
        },
        "pca": {
            "explained_variance_ratio": explained,
            "fitted_from_position": fit_from,
            "rms_normalized": pca_normalize,
            "fitted_from_loop": first_loop,
            # coords[loop][position] = [pc1, pc2]; loop 0 is the encoder output h_0
            "coords": coords.tolist(),
        },
        "gate_mean_coefficient": gates,  # [loop][position], loop index 0 = loop 1 (ungated: 1.0)
        "relative_step": steps,  # [loop][position]: ||h_t - h_{t-1}|| / ||h_{t-1}||, t = 1..B
        "confidence": confidences,  # [loop][position]
        "thinking_trace": thinking,
    }


def _show(text: str) -> str:
    """A token as readable text: escapes visible, a whitespace-only token shown with visible blanks."""
    shown = repr(text)[1:-1]
    return shown.replace(" ", "\u2423") if not text.strip() else shown


def thinking_table(trace: dict[str, Any], max_width: int = 12) -> str:
    """The thinking trace as a plain-text table: one row per position, one column per loop."""

    def cell(text: str) -> str:
        text = _show(text)
        return text if len(text) <= max_width else text[: max_width - 1] + "~"

    loops = trace["num_loops"]
    header = ["pos", "token"] + [f"loop {t}" for t in range(1, loops + 1)]
    rows = [[str(r["position"]), cell(r["token"])] + [cell(t) for t in r["next_token_by_loop"]]
            for r in trace["thinking_trace"]]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows])


def thinking_html(trace: dict[str, Any]) -> str:
    """The thinking trace as an HTML table; cell shade = probability, bold = changed since the previous loop."""
    loops = trace["num_loops"]
    split = trace["split"]
    head = "".join(f"<th>loop {t}</th>" for t in range(1, loops + 1))
    body = []
    for row in trace["thinking_trace"]:
        cells = []
        previous = None
        for t, candidates in enumerate(row["top_k_by_loop"]):
            best = candidates[0]
            shade = int(255 - 155 * best["prob"])
            changed = previous is not None and best["token"] != previous
            title = html.escape(", ".join(f"{c['token']!r} {c['prob']:.2f}" for c in candidates), quote=True)
            text = html.escape(_show(best["token"]))
            style = f"background: rgb({shade},{shade},255);" + (" font-weight: bold;" if changed else "")
            conf = trace["confidence"][t][row["position"]]
            cells.append(f'<td style="{style}" title="{title}; confidence {conf:.2f}">{text}'
                         f'<span class="p">{best["prob"]:.2f}</span></td>')
            previous = best["token"]
        token = html.escape(_show(row["token"]))
        body.append(f"<tr><td>{row['position']}</td><th>{token}</th>{''.join(cells)}</tr>")
    prompt = html.escape(trace["prompt"] or "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>LoopUS thinking trace</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-family: monospace; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: left; white-space: pre; }}
th {{ background: #f3f3f3; }}
.p {{ color: #666; font-size: 75%; margin-left: 4px; }}
</style></head><body>
<h2>Thinking trace</h2>
<p>Prompt: <code>{prompt}</code><br>
Split: encoder {split['encoder_layers']}, reasoning layers {split['reasoning_layers'][0]}..{split['reasoning_layers'][1]},
decoder {split['decoder_layers']}. Each cell is the top next-token decoded from the state after that loop, with its
probability (darker = more probable; bold = changed since the previous loop; hover for the top-k and the confidence
head's score). Loop 1 equals the base model.</p>
<table><tr><th>pos</th><th>input token</th>{head}</tr>
{chr(10).join(body)}
</table></body></html>
"""


def plot_trace(trace: dict[str, Any], path: str | os.PathLike) -> None:
    """Four panels: PCA trajectories, gate coefficient, successive-state distance, confidence per loop."""
    plt = pyplot()
    loops = trace["num_loops"]
    coords = np.asarray(trace["pca"]["coords"])  # (loops + 1, seq, 2)
    seq = coords.shape[1]
    first = trace["pca"]["fitted_from_position"]
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0, 0]
    for pos in range(first, seq):
        colour = cmap(pos / max(seq - 1, 1))
        ax.plot(coords[1:, pos, 0], coords[1:, pos, 1], "-", color=colour, lw=1, alpha=0.8)
        ax.scatter(coords[1:, pos, 0], coords[1:, pos, 1], c=[colour], s=8 + 50 * np.arange(1, loops + 1) / loops,
                   zorder=3)
        ax.scatter(coords[1, pos, 0], coords[1, pos, 1], marker="x", color="black", s=14, zorder=4, lw=0.8)
        if seq <= 24:
            ax.annotate(_show(trace["tokens"][pos])[:10], coords[-1, pos], fontsize=7, alpha=0.8)
    ev = trace["pca"]["explained_variance_ratio"]
    ax.set_xlabel(f"PC1 ({ev[0]:.0%})")
    ax.set_ylabel(f"PC2 ({ev[1]:.0%})" if len(ev) > 1 else "PC2")
    scaled = " (unit-RMS states)" if trace["pca"].get("rms_normalized") else ""
    ax.set_title(f"PCA of each token's state across loops{scaled}\nx = loop 1 (the base model), dots grow with the loop",
                 fontsize=10)
    ax.grid(True, alpha=0.3)

    x = np.arange(1, loops + 1)

    def per_token(ax, values, title, ylabel, logy=False):
        values = np.asarray(values)  # (loops, seq)
        for pos in range(first, seq):
            ax.plot(x, values[:, pos], color=cmap(pos / max(seq - 1, 1)), lw=0.8, alpha=0.5)
        ax.plot(x, values[:, first:].mean(1), color="black", lw=2.2, marker="o", label="mean over tokens")
        if logy and np.all(values[:, first:] > 0):
            ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xlabel("loop t")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)

    per_token(axes[0, 1], trace["gate_mean_coefficient"], "gate mixing share a_t (mean over channels; loop 1 ungated)",
              "a_t (share of the new proposal)")
    axes[0, 1].set_ylim(0, 1.05)
    per_token(axes[1, 0], trace["relative_step"], "distance between successive states", "||h_t - h_t-1|| / ||h_t-1||",
              logy=True)
    per_token(axes[1, 1], trace["confidence"], "confidence head: P(no more loops needed)", "confidence")
    axes[1, 1].set_ylim(-0.02, 1.02)
    split = trace["split"]
    prompt = (trace["prompt"] or "")[:80]
    fig.suptitle(
        f"LoopUS trace, {loops} loops, split {split['encoder_layers']}/"
        f"{split['reasoning_layers'][1] - split['reasoning_layers'][0] + 1}/{split['decoder_layers']}: {prompt!r}",
        fontsize=11,
    )
    save_figure(fig, path, rect=(0, 0, 1, 0.96))


def write_trace(trace: dict[str, Any], out: str | os.PathLike) -> dict[str, str]:
    """Write trace.json, trace.png, trace.html and thinking_trace.txt to `out`; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / "trace.json",
        "png": out / "trace.png",
        "html": out / "trace.html",
        "table": out / "thinking_trace.txt",
    }
    files["json"].write_text(json.dumps(trace, indent=1))
    plot_trace(trace, files["png"])
    files["html"].write_text(thinking_html(trace), encoding="utf-8")
    files["table"].write_text(thinking_table(trace) + "\n", encoding="utf-8")
    return {k: str(v) for k, v in files.items()}
