"""Figures of the views that act on the model (interventions, fidelity, intermediates): one panel per metric,
a line per lens and condition over layers, with its 95% interval as a band. Drawn from one tidy table with
columns ``lens, layer, condition, metric, value, ci_low, ci_high``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from lenses.pages.plots import integer_layers, pyplot, save_figure


def plot_metrics(table: pd.DataFrame, panels: list[tuple[str, str, str]], path: str | os.PathLike,
                 title: str = "") -> Path:
    """``panels``: ``(metric, panel title, y label)``; a control condition (its name ends in ``random``) is
    drawn dashed in its lens's colour."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    lenses = list(dict.fromkeys(table.lens))
    colors = dict(zip(lenses, plt.cm.tab10(np.arange(len(lenses)))))
    for ax, (metric, name, ylabel) in zip(axes[0], panels):
        rows = table[table.metric == metric]
        for (lens, condition), part in rows.groupby(["lens", "condition"], sort=False):
            part = part.sort_values("layer")
            style = "--" if str(condition).endswith("random") else "-"
            ax.plot(part.layer, part.value, style, marker=".", color=colors[lens], label=f"{lens}: {condition}")
            if part.ci_low.notna().any():
                ax.fill_between(part.layer, part.ci_low, part.ci_high, color=colors[lens], alpha=0.15, lw=0)
        ax.set(title=name, xlabel="layer", ylabel=ylabel)
        integer_layers(ax)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:  # e.g. no swap prompt: the model answered none of the facts right
            ax.text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
