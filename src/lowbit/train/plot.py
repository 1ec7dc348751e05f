"""Loss curves as PNG files (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

__all__ = ["plot_losses"]


def _smooth(xs: Sequence[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_losses(curves: Mapping[str, Sequence[float]], path: str | os.PathLike[str], *, title: str = "training loss",
                eval_points: Mapping[str, Sequence[tuple[int, float]]] | None = None, smooth: int = 10) -> str:
    """Plot one or more per-step loss curves (raw, faint; moving average over ``smooth`` steps, solid).

    Args:
        curves: label -> per-step training losses.
        path: PNG file to write.
        eval_points: label -> ``[(step, eval_loss), ...]`` drawn as markers.

    Returns:
        ``path`` as a string.
    """
    if not curves:
        raise ValueError("plot_losses needs at least one curve")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, (label, ys) in enumerate(curves.items()):
        color = f"C{i}"
        xs = list(range(1, len(ys) + 1))
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, _smooth(list(ys), max(1, smooth)), color=color, label=label, linewidth=1.6)
    for i, (label, pts) in enumerate((eval_points or {}).items()):
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--", color=f"C{i}", label=f"{label} (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)
