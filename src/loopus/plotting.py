"""Matplotlib set-up shared by the figures loopus writes (dynamics, trace, evaluation report).

Every figure is drawn off screen on the Agg backend (no display is needed on a server) and written
as a 110-dpi PNG, after which the figure is freed (the commands draw many in one process).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend; imported on first use, as plotting is optional work."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay `fig` out (inside `rect`, leaving room for a suptitle), write it to `path` as PNG and free it."""
    plt = pyplot()
    fig.tight_layout(rect=rect)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
