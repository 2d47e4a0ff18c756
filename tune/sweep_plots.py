"""Pictures of a sweep: the metric against each searched parameter, and each trial's curve over epochs.

Trials stopped early by the scheduler are drawn in orange (their curves dashed, ending in a cross),
trials that ran every epoch in blue; errored trials have no point.
"""

from __future__ import annotations

import io

from tune.results import TrialSummary
from tune.space import Domain

PARAMS_PLOT = "metric_vs_params.png"
CURVES_PLOT = "metric_curves.png"
_COLORS = {"done": "tab:blue", "stopped early": "tab:orange"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_params(summaries: list[TrialSummary], domains: dict[str, Domain], metric: str) -> bytes:
    """One panel per searched parameter: each trial's best metric at its value (log axis for loguniform)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(domains)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    scored = [s for s in summaries if s.best is not None]
    for ax, name in zip(axes.flat, names):
        d = domains[name]
        categorical = d.kind in ("choice", "grid")
        labels = [str(v) for v in d.values] if categorical else None
        for state, color in _COLORS.items():
            pts = [(s.params[name], s.best[metric]) for s in scored if s.status == state]
            if not pts:
                continue
            xs = [labels.index(str(x)) if categorical else x for x, _ in pts]
            ax.scatter(xs, [y for _, y in pts], c=color, label=state, s=28, alpha=0.8)
        if categorical:
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        elif d.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles, legend_labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, legend_labels, loc="upper right")
    fig.suptitle(f"best validation {metric} of each trial against its parameters")
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def plot_curves(summaries: list[TrialSummary], metric: str) -> bytes:
    """The metric over epochs, one line per trial; early-stopped trials dashed and crossed at their end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for s in summaries:
        if not s.curve:
            continue
        xs, ys = zip(*s.curve)
        stopped = s.status == "stopped early"
        color = _COLORS.get(s.status, "tab:gray")
        ax.plot(xs, ys, linestyle="--" if stopped else "-", marker="o", ms=3, color=color, alpha=0.8)
        if stopped:
            ax.plot(xs[-1], ys[-1], marker="x", ms=9, color=color)
        ax.annotate(s.trial_id, (xs[-1], ys[-1]), fontsize=7, xytext=(3, 0), textcoords="offset points")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epochs trained")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"{metric} per trial (blue: all epochs, orange dashed: stopped early)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data
