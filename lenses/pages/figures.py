"""The views' figures: one function per view, each drawn from the view's tables (`lenses.analysis.table`
names which). The depth-analysis views follow Gupta et al. 2025 (arXiv 2510.18871)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from lenses.pages.plots import integer_layers, plot_message, pyplot, save_figure

LENS_STYLE = {"logit": "--", "tuned": "-"}


def _style(lens: str) -> str:
    return LENS_STYLE.get(lens, "-.")


def plot_frequency(layers: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Per lens: 100%-stacked shares of top-1 guesses per frequency bucket with the final
    predictions' shares as a bar on the right; then flip rate per bucket and mass on ranks 1-10."""
    plt = pyplot()
    lenses = list(dict.fromkeys(layers.lens))
    buckets = list(dict.fromkeys(layers.bucket))
    fig, axes = plt.subplots(1, len(lenses) + 2, figsize=(4.6 * (len(lenses) + 2), 4.2))
    colors = plt.cm.viridis_r([0.15, 0.4, 0.65, 0.9])
    for ax, lens in zip(axes, lenses):
        wide = layers[layers.lens == lens].pivot(index="layer", columns="bucket", values="share")[buckets]
        ax.stackplot(wide.index, wide.T.to_numpy(), labels=[f"ranks {b}" for b in buckets], colors=colors, alpha=0.9)
        last = layers[(layers.lens == lens) & (layers.layer == wide.index.max())]
        final = last.set_index("bucket").final_share[buckets]
        bottom, x = 0.0, wide.index.max() + 1.5
        for b, c in zip(buckets, colors):
            ax.bar(x, final[b], bottom=bottom, color=c, width=1.2, edgecolor="k", lw=0.5)
            bottom += final[b]
        ax.set(title=f"{lens} lens: top-1 by token frequency", xlabel="layer (bar: final predictions)",
               ylabel="share of top-1 guesses", ylim=(0, 1), xlim=(0, x + 1))
        integer_layers(ax)
    axes[0].legend(loc="lower right", fontsize=8)
    ax = axes[-2]
    for lens in lenses:
        for b, c in zip(buckets, colors):
            rows = layers[(layers.lens == lens) & (layers.bucket == b) & (layers.n_guesses >= 5)]
            ax.plot(rows.layer, rows.flip_rate, _style(lens), color=c, label=f"{lens}: {b}")
    ax.set(title="guesses later refined (flip rate)", xlabel="layer", ylabel="share differing from final top-1",
           ylim=(0, 1.02))
    ax.legend(fontsize=7, ncol=2)
    ax = axes[-1]
    for lens in lenses:
        rows = layers[(layers.lens == lens) & (layers.bucket == buckets[0])]
        ax.plot(rows.layer, rows.mean_mass, _style(lens), marker=".", label=f"{lens} lens")
    ax.axhline(rows.mean_mass.iloc[-1], color="grey", ls=":", lw=1, label="final layer")
    ax.set(title=f"probability mass on ranks {buckets[0]}", xlabel="layer", ylabel="mean mass")
    ax.legend(fontsize=8)
    integer_layers(*axes[-2:])
    fig.tight_layout()
    return save_figure(fig, path)


def _onset_panel(ax, curves: pd.DataFrame, by: str, title: str, colors: dict | None = None) -> None:
    for (lens, key), rows in curves.groupby(["lens", by], sort=True):
        rows = rows[rows.n > 0]
        kw = {"color": colors[key]} if colors and key in colors else {}
        ax.plot(rows.k, rows.mean_layer, _style(lens), marker=".", label=f"{lens}: {key}", **kw)
    ax.set(xscale="log", xlabel="k (target within top-k)", ylabel="mean first layer", title=title)
    ax.grid(alpha=0.3)


def plot_pos(tags: pd.DataFrame, curves: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Mean first-correct and settled layer per tag (function words blue, content words orange),
    and onset-vs-k curves of function vs content words."""
    plt = pyplot()
    lenses = list(dict.fromkeys(tags.lens))
    fig, axes = plt.subplots(1, len(lenses) + 1, figsize=(5.2 * (len(lenses) + 1), 4.4))
    group_color = {"function": "C0", "content": "C1", "other": "C7"}
    for ax, lens in zip(axes, lenses):
        rows = tags[(tags.lens == lens) & (tags.n_correct > 0)].sort_values("mean_first_correct")
        y = range(len(rows))
        err = None
        if "ci_low" in rows:  # the 95% interval (bootstrap by text); none where a tag has one text
            err = [(rows.mean_first_correct - rows.ci_low).fillna(0).clip(lower=0),
                   (rows.ci_high - rows.mean_first_correct).fillna(0).clip(lower=0)]
        ax.barh(y, rows.mean_first_correct, xerr=err, color=[group_color[g] for g in rows.group], alpha=0.85,
                label="first correct (95% interval)", error_kw={"elinewidth": 0.8, "capsize": 2})
        ax.scatter(rows.mean_settled, y, color="k", marker="|", s=120, label="settled")
        ax.set_yticks(list(y), [f"{t} ({n})" for t, n in zip(rows.tag, rows.n_correct)], fontsize=8)
        ax.set(xlabel="mean layer", title=f"{lens} lens: depth by part of speech")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3, axis="x")
    merged = curves.assign(n_w=curves.n * curves.mean_layer)
    grouped = merged[merged.group != "other"].groupby(["lens", "group", "k"], as_index=False).agg(n=("n", "sum"),
                                                                                                  s=("n_w", "sum"))
    grouped["mean_layer"] = grouped.s / grouped.n.where(grouped.n > 0)
    _onset_panel(axes[-1], grouped, "group", "onset vs k: function vs content", group_color)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_facts(by_index: pd.DataFrame, curves: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Onset-vs-k curves per answer-token index, and mean first-correct / settled layer per index."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"1": "C3", "2": "C0", "3+": "C2"}
    _onset_panel(ax1, curves, "token_index", "fact recall: onset vs k per answer token", colors)
    ax1.legend(fontsize=8)
    lenses = list(dict.fromkeys(by_index.lens))
    width = 0.8 / len(lenses)
    for i, lens in enumerate(lenses):
        rows = by_index[by_index.lens == lens]
        x = [j + i * width for j in range(len(rows))]
        err = None
        if "first_correct_ci_low" in rows:  # the 95% interval (bootstrap by fact)
            err = [(rows.mean_first_correct - rows.first_correct_ci_low).fillna(0).clip(lower=0),
                   (rows.first_correct_ci_high - rows.mean_first_correct).fillna(0).clip(lower=0)]
        ax2.bar(x, rows.mean_first_correct, width, yerr=err, capsize=3, label=f"{lens}: first correct", alpha=0.85)
        ax2.scatter(x, rows.mean_settled, marker="_", s=300, color="k", label="settled" if i == 0 else None)
        ax2.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))],
                       [f"token {t}\n(n={n})" for t, n in zip(rows.token_index, rows.n_correct)])
    ax2.set(ylabel="mean layer", title="depth per answer token")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_mcq(layers: pd.DataFrame, questions: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Per layer: mass on the option letters, probability of the correct letter and share of
    questions with all letters in the top 4; then the layers where format and answer are found."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for lens, rows in layers.groupby("lens", sort=False):
        ax1.plot(rows.layer, rows.letter_mass, _style(lens), color="C0", label=f"{lens}: mass on A-D")
        ax1.plot(rows.layer, rows.format_share, _style(lens), color="C2", label=f"{lens}: A-D all in top 4")
        ax1.plot(rows.layer, rows.prob_gold, _style(lens), color="C3", label=f"{lens}: p(correct letter)")
    ax1.set(xlabel="layer", ylabel="mean over questions", ylim=(0, 1.02),
            title="multiple choice: format before answer?")
    ax1.legend(fontsize=7)
    integer_layers(ax1)
    cols = ["format_found", "format_settled", "answer_found", "choice_settled"]
    lenses = list(dict.fromkeys(questions.lens))
    data, labels = [], []
    for lens in lenses:
        for c in cols:
            data.append(questions.loc[questions.lens == lens, c].dropna().to_numpy())
            labels.append(f"{lens}\n{c.replace('_', ' ')}")
    ax2.boxplot(data, vert=False, tick_labels=labels)
    ax2.set(xlabel="layer", title="per question")
    ax2.tick_params(axis="y", labelsize=7)
    ax2.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_early_exit(layers: pd.DataFrame, adaptive: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Left: exiting at layer l, agreement with the full model and accuracy on the next token, per lens.
    Right: adaptive exit (first layer whose top-1 probability reaches a threshold): mean exit layer
    against agreement, one point per threshold."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for lens, rows in layers.groupby("lens", sort=False):
        ax1.plot(rows.layer, rows.agreement, _style(lens), color="C0", label=f"{lens}: agrees with full model")
        ax1.plot(rows.layer, rows.accuracy, _style(lens), color="C3", label=f"{lens}: next-token accuracy")
        for col, color in (("agreement", "C0"), ("accuracy", "C3")):
            if f"{col}_ci_low" in rows:  # 95% interval, resampled by text
                ax1.fill_between(rows.layer, rows[f"{col}_ci_low"], rows[f"{col}_ci_high"], color=color, alpha=0.12)
    ax1.set(xlabel="exit layer", ylabel="share of positions", ylim=(0, 1.02), title="early exit at layer l")
    ax1.legend(fontsize=7)
    integer_layers(ax1)
    for lens, rows in adaptive.groupby("lens", sort=False):
        ax2.plot(rows.mean_exit_layer, rows.agreement, _style(lens) + "o", label=lens, markersize=4)
        for r in rows.itertuples():
            if r.threshold in (0.5, 0.9, 0.99):
                ax2.annotate(f"{r.threshold:g}", (r.mean_exit_layer, r.agreement), fontsize=7,
                             textcoords="offset points", xytext=(3, -9))
    ax2.set(xlabel="mean exit layer", ylabel="agreement with full model", ylim=(0, 1.02),
            title="adaptive exit: top-1 probability >= threshold")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_patching(layers: pd.DataFrame, reads: pd.DataFrame, pairs: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Left: patching the source's hidden[l] into the target: mean probability mass on the source's and
    the target's labels after the patch, and the same masses read by each lens on the source prompt.
    Right: per pair, the switch layer against each lens's switch layer."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    mean = layers.groupby("layer")[["mass_source", "mass_target"]].mean()
    ax1.plot(mean.index, mean.mass_source, "-", color="C3", lw=2, label="patched output: source labels")
    ax1.plot(mean.index, mean.mass_target, "-", color="C0", lw=2, label="patched output: target labels")
    for lens, rows in reads.groupby("lens", sort=False):
        m = rows.groupby("layer")[["mass_source", "mass_target"]].mean()
        ax1.plot(m.index, m.mass_source, _style(lens), color="C1", label=f"{lens} lens on source: source labels")
    ax1.set(xlabel="layer l (hidden[l] patched / read)", ylabel="mean probability mass", ylim=(0, 1.02),
            title=f"cross-task patching ({len(pairs)} pairs)")
    ax1.legend(fontsize=7)
    integer_layers(ax1)
    lens_cols = [c for c in pairs.columns if c.startswith("lens_switch_")]
    rng = np.random.default_rng(0)
    for i, col in enumerate(lens_cols):
        jitter = rng.uniform(-0.2, 0.2, len(pairs))
        ax2.scatter(pairs[col] + jitter, pairs.switch_layer + jitter[::-1], s=12, alpha=0.6, color=f"C{i + 2}",
                    label=col.removeprefix("lens_switch_") + " lens")
    top = float(layers.layer.max())
    ax2.plot([0, top], [0, top], "k:", lw=1, label="equal")
    ax2.set(xlabel="lens switch layer (source labels ahead from there on)", ylabel="patching switch layer",
            title="does patching switch where the lens reads it?")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_layer_skip(effects: pd.DataFrame, output: pd.DataFrame, path: str | os.PathLike) -> Path:
    """One L x L panel per lens: mean KL of the readout at layer m (x) when block l (y) is skipped,
    log colour scale; last panel: the output's KL and accuracy per skipped block."""
    from matplotlib.colors import LogNorm

    plt = pyplot()
    lens_names = list(dict.fromkeys(effects.lens))
    fig, axes = plt.subplots(1, len(lens_names) + 1, figsize=(5.2 * (len(lens_names) + 1), 4.4), squeeze=False)
    L = int(effects.layer.max())
    vmax = max(float(effects.kl.max()), 1e-3)
    for ax, lens in zip(axes[0], lens_names):
        grid = effects[effects.lens == lens].pivot(index="skipped", columns="layer", values="kl")
        grid = grid.reindex(index=range(L), columns=range(L + 1))
        image = ax.imshow(grid.to_numpy(dtype=float).clip(1e-4), origin="lower", aspect="auto", cmap="magma_r",
                          norm=LogNorm(1e-4, vmax))
        ax.set(xlabel="readout layer m", ylabel="skipped block l", title=f"{lens} lens: KL(unskipped || skipped)")
        fig.colorbar(image, ax=ax, fraction=0.046).set_label("nats", fontsize=7)
    ax = axes[0][-1]
    ax.plot(output.skipped, output.kl_output, "o-", color="C3", markersize=3, label="output KL (nats)")
    ax.set(xlabel="skipped block l", ylabel="KL of the output", title="the model's output")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(output.skipped, output.accuracy, "s-", color="C0", markersize=3, label="accuracy")
    twin.axhline(output.accuracy_unskipped.iloc[0], color="C0", ls=":", lw=1)
    twin.set(ylabel="next-token accuracy", ylim=(0, 1))
    ax.legend(loc="upper right", fontsize=7)
    twin.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_calibration(layers: pd.DataFrame, bins: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Expected calibration error per layer against the final top-1 and the next token (95% bands,
    resampled by text), and the reliability curves against the next token at the middle layer."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    last = layers.layer.max()  # against the final top-1, layer L agrees by definition: not drawn
    for ax, (ref, what) in zip(axes[:2], (("final", "the model's final top-1"), ("next", "the next token"))):
        shown = layers[(layers.reference == ref) & ((ref == "next") | (layers.layer < last))]
        for lens, rows in shown.groupby("lens", sort=False):
            line, = ax.plot(rows.layer, rows.ece, _style(lens), marker=".", label=lens)
            ax.fill_between(rows.layer, rows.ci_low, rows.ci_high, color=line.get_color(), alpha=0.2)
        ax.set(xlabel="layer", ylabel="expected calibration error", title=f"top-1 probability vs {what}")
        ax.grid(alpha=0.3)
        integer_layers(ax)
    mid = int(layers.layer.max()) // 2
    ax = axes[2]
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="calibrated")
    for lens, rows in bins[(bins.reference == "next") & (bins.layer == mid) & (bins.n > 0)].groupby("lens", sort=False):
        ax.plot(rows.confidence, rows.accuracy, _style(lens), marker="o", label=lens)
    ax.set(xlabel="top-1 probability (bin mean)", ylabel="share that is the next token", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability at layer {mid}")
    ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_sublayer(layers: pd.DataFrame, buckets: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Which part of each block makes the refinements: the share of events made by attention and by the MLP
    per layer (95% bands, by text), and by the frequency bucket of the new top-1."""
    if layers.empty:
        return plot_message("no refinement events: every lens's top-1 is the same at every layer", path)
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8))
    for k, (lens, rows) in enumerate(layers.groupby("lens", sort=False)):  # a color per lens, a line per part
        for part, style in (("mlp", "-"), ("attention", ":")):
            a.plot(rows.layer, rows[f"share_{part}"], style, color=f"C{k}", marker=".", label=f"{lens}: {part}")
            a.fill_between(rows.layer, rows[f"share_{part}_ci_low"], rows[f"share_{part}_ci_high"], color=f"C{k}",
                           alpha=0.12)
    a.set(xlabel="block (layer l -> l + 1)", ylabel="share of refinement events", ylim=(0, 1),
          title="which part changed the top-1")
    a.grid(alpha=0.3)
    integer_layers(a)
    a.legend(fontsize=7, ncol=2)
    lenses = list(dict.fromkeys(buckets.lens))
    width = 0.8 / max(1, len(lenses))
    for k, lens in enumerate(lenses):
        rows = buckets[buckets.lens == lens]
        x = np.arange(len(rows)) + k * width
        b.bar(x, rows.share_mlp, width, color=f"C{k}", label=f"{lens}: MLP")
        b.bar(x, rows.share_attention, width, bottom=rows.share_mlp, color=f"C{k}", alpha=0.35,
              label=f"{lens}: attention")
        b.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, rows.new_bucket)
    b.set(xlabel="frequency rank of the new top-1", ylabel="share of refinement events", ylim=(0, 1),
          title="by token frequency")
    b.legend(fontsize=7)
    return save_figure(fig, path)


def plot_agreement(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Per-layer top-1 agreement and symmetric KL between each pair of lenses (agreement view)."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for (x, y), rows in table.groupby(["lens_a", "lens_b"], sort=False):
        a.plot(rows.layer, rows.top1_agreement, marker=".", label=f"{x} vs {y}")
        b.plot(rows.layer, rows.sym_kl, marker=".", label=f"{x} vs {y}")
    a.set(xlabel="layer", ylabel="top-1 agreement", ylim=(0, 1.02), title="same top-1 token")
    b.set(xlabel="layer", ylabel="KL(p||q) + KL(q||p), nats", yscale="symlog", title="symmetric KL")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        integer_layers(ax)
    a.legend(fontsize=8)
    return save_figure(fig, path)
