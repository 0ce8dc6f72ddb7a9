"""Figures drawn from the tidy CSV tables (so every plot can be redrawn without the model)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from lenses.base.io import atomic_write, signature
from lenses.base.outdir import check_target


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def integer_layers(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)


def save_figure(fig, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``fig`` (signed as ours, `lenses.base.io.signature`); a file lenses did not write, or another run's, is
    refused unless ``overwrite`` (`lenses.base.outdir.check_target`)."""
    path = check_target(path, overwrite, "the figure")
    fmt = path.suffix.lstrip(".").lower() or "png"
    sign = signature()
    meta = {"png": {"Software": sign}, "pdf": {"Creator": sign}, "svg": {"Creator": sign}}.get(fmt)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=130, bbox_inches="tight", metadata=meta))
    pyplot().close(fig)
    return path


def plot_message(text: str, path: str | os.PathLike) -> Path:
    """A figure that says why there is nothing to plot (a view with an empty result)."""
    import textwrap

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 2.5))
    ax.axis("off")
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(text, 70)), ha="center", va="center", fontsize=10)
    return save_figure(fig, path)


def plot_probe_bias(shares: pd.DataFrame, kl: pd.DataFrame, path: str | os.PathLike, bucket: str = "1-10") -> Path:
    """Left: share of each layer's top-1 in the most frequent bucket, per training variant (tuned
    lens), with the logit lens and the model's final predictions for reference. Right: what the
    reweighting costs in held-out KL per layer."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"wspace": 0.3})
    top = shares[shares.bucket == bucket]
    n_layers = int(top.layer.max())
    for variant, rows in top[top.lens == "tuned"].groupby("variant", sort=False):
        ax1.plot(rows.layer, rows.share, marker=".", label=f"tuned: {variant}")
    logit = top[(top.lens == "logit")].drop_duplicates("layer")
    ax1.plot(logit.layer, logit.share, "k--", label="logit lens")
    final = logit[logit.layer == n_layers].share.iloc[0]
    ax1.axhline(final, color="grey", lw=0.8, ls=":", label=f"final predictions ({final:.0%})")
    ax1.set(xlabel="layer", ylabel=f"share of top-1 in frequency ranks {bucket}", ylim=(0, 1),
            title="Are early guesses frequent tokens?")
    ax1.legend(fontsize=8)
    for variant, rows in kl[kl.lens == "tuned"].groupby("variant", sort=False):
        ax2.plot(rows.layer, rows.kl_nats, marker=".", label=f"tuned: {variant}")
    logit_kl = kl[kl.lens == "logit"].drop_duplicates("layer")
    ax2.plot(logit_kl.layer, logit_kl.kl_nats, "k--", label="logit lens")
    ax2.set(xlabel="layer", ylabel="held-out KL(final || lens), nats", yscale="log", title="Cost of reweighting")
    ax2.legend(fontsize=8)
    integer_layers(ax1, ax2)
    return save_figure(fig, path)


def plot_heldout_kl(table: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """Held-out KL per layer for each lens (the eval.csv of a training run)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for lens, rows in table.groupby("lens", sort=False):
        ax.plot(rows.layer, rows.kl_nats, marker=".", label=f"{lens} lens")
    ax.set(xlabel="layer", ylabel="held-out KL(final || lens), nats", yscale="log", title=title)
    ax.legend()
    integer_layers(ax)
    return save_figure(fig, path)


def plot_convergence(log: pd.DataFrame, path: str | os.PathLike) -> Path:
    """A Jacobian-lens fit's convergence: the running mean's relative change per prompt (it falls like
    1/n once the estimate settles) and its mean distance from the identity."""

    rel = log.rel_change.to_numpy(dtype=float)
    if not (np.isfinite(rel) & (rel > 0)).any():  # one prompt: no change measured yet
        return plot_message(f"{len(log)} prompt(s) fitted: the running mean's change needs two or more; fit more "
                            "prompts (--num-prompts) to see convergence.", path)
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(log.n_done, log.rel_change, marker=".")
    a.set(xlabel="prompts fitted", ylabel="relative change of the mean", xscale="log", yscale="log",
          title="convergence (max over layers)")
    b.plot(log.n_done, log.dist_identity, marker=".")
    b.set(xlabel="prompts fitted", ylabel="||J - I|| / sqrt(d), mean over layers", xscale="log",
          title="distance from the logit lens")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_representation(summary: pd.DataFrame, per_prompt: pd.DataFrame, path: str | os.PathLike,
                        hist_layer: int | None = None) -> Path:
    """Each metric against relative depth (median and 10-90% band where per prompt), plus a
    histogram of prompt entropy at ``hist_layer`` (default: the middle layer) to show bimodality."""
    plt = pyplot()
    metrics = list(dict.fromkeys(summary.metric))
    n = len(metrics) + 1
    cols = 4
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3.2 * ((n + cols - 1) // cols)))
    axes = axes.ravel()
    for ax, metric in zip(axes, metrics):
        rows = summary[summary.metric == metric].sort_values("layer")
        if rows["q50"].notna().any():
            ax.plot(rows.relative_depth, rows.q50, marker=".", label="median")
            ax.fill_between(rows.relative_depth, rows.q10, rows.q90, alpha=0.25, label="10-90%")
        else:
            ax.plot(rows.relative_depth, rows["mean"], marker=".")
        ax.set(title=metric.replace("_", " "), xlabel="relative depth")
        ax.grid(alpha=0.3)
    layers = int(per_prompt.layer.max())
    hist_layer = layers // 2 if hist_layer is None else hist_layer
    values = per_prompt[(per_prompt.metric == "prompt_entropy") & (per_prompt.layer == hist_layer)].value
    ax = axes[len(metrics)]
    ax.hist(values, bins=30, color="C2")
    ax.set(title=f"prompt entropy at layer {hist_layer}", xlabel="normalised entropy", ylabel="prompts")
    for ax in axes[n:]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)
