"""The figure of `loopus analyze`: per-layer dynamics curves with the chosen split shaded, and the CKA map."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .plotting import pyplot, save_figure
from .split import SplitChoice


def plot_dynamics(
    metrics: dict[str, Any], choice: SplitChoice, path: str | os.PathLike, title: str = ""
) -> None:
    """Per-layer curves with the encoder / reasoning / decoder stages shaded, plus the layer-by-layer CKA map."""
    plt = pyplot()
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
    save_figure(fig, path, rect=(0, 0, 1, 0.95))
