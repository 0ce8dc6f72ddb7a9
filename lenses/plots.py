"""Figures drawn from the tidy CSV tables (so every plot can be redrawn without the model)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .io import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_layers(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=130, bbox_inches="tight"))
    _pyplot().close(fig)
    return path


def plot_probe_bias(shares: pd.DataFrame, kl: pd.DataFrame, path: str | os.PathLike, bucket: str = "1-10") -> Path:
    """Left: share of each layer's top-1 in the most frequent bucket, per training variant (tuned
    lens), with the logit lens and the model's final predictions for reference. Right: what the
    reweighting costs in held-out KL per layer."""
    plt = _pyplot()
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
    _integer_layers(ax1, ax2)
    return _save(fig, path)


def plot_heldout_kl(table: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """Held-out KL per layer for each lens (the eval.csv of a training run)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for lens, rows in table.groupby("lens", sort=False):
        ax.plot(rows.layer, rows.kl_nats, marker=".", label=f"{lens} lens")
    ax.set(xlabel="layer", ylabel="held-out KL(final || lens), nats", yscale="log", title=title)
    ax.legend()
    _integer_layers(ax)
    return _save(fig, path)
