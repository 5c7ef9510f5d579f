"""Convergence pictures: residual against iteration, per sample, for the forward and backward solves.

Needs matplotlib (``pip install fpidsl[plot]``); record the history with ``history=True`` (on
:func:`fpidsl.fixed_point`, or ``Layer(history=True)``)."""
from __future__ import annotations

import torch

MISSING_MATPLOTLIB = ("plot_convergence needs matplotlib, which is not installed: "
                      "pip install 'fpidsl[plot]' (or pip install matplotlib)")
NO_HISTORY = ("these stats hold no residual history: record it with history=True "
              "(fpidsl.fixed_point(..., history=True) or Layer(history=True)) and run the layer again")


def plot_convergence(stats, path: str, max_samples: int = 16) -> None:
    """Draw the residual of each sample against the iteration, forward and (when it ran) backward, to
    ``path`` (any format matplotlib writes: .png, .svg, .pdf)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError(MISSING_MATPLOTLIB) from None
    solves = [(name, s) for name, s in (("forward", stats.forward), ("backward", stats.backward)) if s is not None]
    if not solves or any(s.history is None for _, s in solves):
        raise ValueError(NO_HISTORY)
    fig, axes = plt.subplots(1, len(solves), figsize=(5 * len(solves), 3.6), squeeze=False)
    for ax, (name, solve) in zip(axes[0], solves):
        history = solve.history.detach().double().cpu()
        history = history.masked_fill(~torch.isfinite(history) | (history <= 0), float("nan"))
        for sample in range(min(history.shape[1], max_samples)):
            ax.semilogy(range(1, history.shape[0] + 1), history[:, sample].numpy(), lw=1, marker=".")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axhline(solve.settings.tol, color="k", ls="--", lw=1, label=f"tol {solve.settings.tol:g}")
        ax.set_title(f"{name} ({solve.settings.method}): {int(solve.ok.sum())}/{solve.batch} converged")
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"{solve.settings.criterion} residual")
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
