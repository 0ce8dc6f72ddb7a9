"""Depth statistics over a trajectory (arrays ``[..., layers]`` read from a trace): the layer where a target
first enters the top k (onset), the layer from which the top-1 stays put (settled), flips, and per-group
summaries (Gupta et al. 2025, arXiv 2510.18871)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from lenses.base import door

ONSET_KS = (1, 10, 100, 1000, 10000)  # the paper's log grid for onset-vs-k curves


def onset_layer(ranks: np.ndarray, k: int) -> np.ndarray:
    """First layer where rank <= k, per trajectory (NaN if never)."""
    hit = np.asarray(ranks) <= k
    first = hit.argmax(-1).astype(float)
    first[~hit.any(-1)] = np.nan
    return first


def settled_layer(is_top: np.ndarray) -> np.ndarray:
    """First layer from which ``is_top`` holds at every deeper layer (NaN if not at the last)."""
    is_top = np.asarray(is_top, dtype=bool)
    n = is_top.shape[-1]
    suffix_all = np.flip(np.cumprod(np.flip(is_top, -1), -1), -1).astype(bool)  # all True from l on
    settled = (n - suffix_all.sum(-1)).astype(float)
    settled[~is_top[..., -1]] = np.nan
    return settled


def flipped(top1: np.ndarray) -> np.ndarray:
    """Whether each layer's top-1 differs from the final layer's."""
    top1 = np.asarray(top1)
    return top1 != top1[..., -1:]


def trajectories(df: pd.DataFrame, column: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Reshape one column of a trace into ``[trajectories, layers]`` plus their (lens, item, position) keys."""
    df = df.sort_values(["lens", "item", "position", "layer"], kind="stable")
    if df.empty:
        return df[["lens", "item", "position"]].reset_index(drop=True), np.zeros((0, 1), dtype=df[column].dtype)
    n_layers = int(df["layer"].max()) + 1
    keys = df[["lens", "item", "position"]].iloc[::n_layers].reset_index(drop=True)
    values = df[column].to_numpy().reshape(-1, n_layers)
    return keys, values


def _check_table(df, column: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise door.fail("df", df, "a table from trace() (a pandas DataFrame)")
    missing = [c for c in ("lens", "item", "position", "layer", column) if c not in df.columns]
    if missing:
        raise door.ArgumentError(f"the table has no column {missing[0]!r}: pass a table from trace() with that "
                                 "target.")


def depth_summary(df: pd.DataFrame, target: str, ks: Sequence[int] = ONSET_KS) -> pd.DataFrame:
    """One row per (lens, item, position): first_correct, settled and onset_k<k> layers for ``target``."""
    _check_table(df, f"rank_{target}")
    keys, ranks = trajectories(df, f"rank_{target}")
    out = keys.copy()
    out["num_layers"] = ranks.shape[1] - 1
    out["final_rank"] = ranks[:, -1]
    out["first_correct"] = onset_layer(ranks, 1)
    out["settled"] = settled_layer(ranks == 1)
    for k in ks:
        out[f"onset_k{k}"] = onset_layer(ranks, k)
    return out


def onset_curve(summary: pd.DataFrame, by: Sequence[str] = ("lens",), ks: Sequence[int] = ONSET_KS) -> pd.DataFrame:
    """Mean onset layer against k (tidy: *by, k, mean_layer, n), from `depth_summary` rows."""
    rows = []
    for key, g in summary.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for k in ks:
            v = g[f"onset_k{k}"].dropna()
            rows.append({**dict(zip(by, key)), "k": k, "mean_layer": v.mean() if len(v) else np.nan, "n": len(v)})
    return pd.DataFrame(rows)
