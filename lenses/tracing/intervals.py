"""Intervals on the views' numbers: a seeded bootstrap that resamples whole texts.

The positions of one text are not independent (they share its topic, its length, its difficulty), so a
mean over positions is resampled *by text* (a cluster bootstrap): each replicate draws as many texts as
there are, with replacement, and recomputes the statistic over all their positions. The interval is the
replicates' 2.5% and 97.5% percentiles. A comparison of two lenses or two groups resamples the same texts
for both (paired), so what they share cancels out of the difference.

    mean, lo, hi = mean_interval(values, texts)                  # a mean over positions, 95% interval
    diff, lo, hi = difference_interval(a, texts_a, b, texts_b)   # mean(a) - mean(b), paired by text
    ece, lo, hi = sums_interval(columns, texts, statistic)       # any statistic of per-text sums

NaN values (e.g. a position never correct) are left out of both numerator and count, as in the plain mean.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

REPLICATES = 2000
LEVEL = 0.95


def _cluster_sums(values, clusters, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster of ``labels``: the sum of the finite ``values`` and how many there are."""
    values, clusters = np.asarray(values, dtype=float), np.asarray(clusters)
    keep = ~np.isnan(values)
    index = np.searchsorted(labels, clusters[keep])
    sums = np.bincount(index, weights=values[keep], minlength=len(labels))
    counts = np.bincount(index, minlength=len(labels)).astype(float)
    return sums, counts


@lru_cache(maxsize=4)
def _weights(n_clusters: int, replicates: int, seed: int) -> np.ndarray:
    """How often each cluster is drawn in each replicate: [replicates, n_clusters] (read-only; cached, as a
    view computes many intervals over the same texts)."""
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n_clusters, np.full(n_clusters, 1 / n_clusters), size=replicates).astype(float)
    w.setflags(write=False)
    return w


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    stats = stats[np.isfinite(stats)]
    if len(stats) == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mean_interval(values, clusters, replicates: int = REPLICATES, level: float = LEVEL,
                  seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` over positions and its bootstrap interval, resampling
    the ``clusters`` (one label per value: the text it came from). Fewer than two texts: no interval (NaN)."""
    labels = np.unique(np.asarray(clusters))
    sums, counts = _cluster_sums(values, clusters, labels)
    mean = sums.sum() / counts.sum() if counts.sum() else float("nan")
    if (counts > 0).sum() < 2:
        return float(mean), float("nan"), float("nan")
    w = _weights(len(labels), replicates, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = (w @ sums) / (w @ counts)
    return (float(mean), *_percentiles(stats, level))


def difference_interval(a, clusters_a, b, clusters_b, replicates: int = REPLICATES, level: float = LEVEL,
                        seed: int = 0) -> tuple[float, float, float]:
    """``(mean(a) - mean(b), low, high)`` with the texts resampled together for both (a paired bootstrap:
    a text drawn twice counts twice on both sides). Texts may hold values on one side only."""
    labels = np.unique(np.concatenate([np.asarray(clusters_a), np.asarray(clusters_b)]))
    sa, na = _cluster_sums(a, clusters_a, labels)
    sb, nb = _cluster_sums(b, clusters_b, labels)
    if not na.sum() or not nb.sum():
        return float("nan"), float("nan"), float("nan")
    diff = sa.sum() / na.sum() - sb.sum() / nb.sum()
    if len(labels) < 2:
        return float(diff), float("nan"), float("nan")
    w = _weights(len(labels), replicates, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = (w @ sa) / (w @ na) - (w @ sb) / (w @ nb)
    return (float(diff), *_percentiles(stats, level))


def sums_interval(values, clusters, statistic, replicates: int = REPLICATES, level: float = LEVEL,
                  seed: int = 0) -> tuple[float, float, float]:
    """``(statistic(totals), low, high)`` for a statistic of sums that is not a plain mean (e.g. a calibration
    error): ``values`` [positions, k] are k additive columns per position, summed per text; each replicate's
    totals are its drawn texts' sums ([replicates, k]); ``statistic`` maps totals [..., k] to [...]."""
    values, clusters = np.asarray(values, dtype=float), np.asarray(clusters)
    labels = np.unique(clusters)
    index = np.searchsorted(labels, clusters)
    per_text = np.zeros((len(labels), values.shape[1]))
    np.add.at(per_text, index, values)
    value = float(statistic(per_text.sum(0)))
    if len(labels) < 2:
        return value, float("nan"), float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = statistic(_weights(len(labels), replicates, seed) @ per_text)
    return (value, *_percentiles(np.asarray(stats, dtype=float), level))


def share_interval(flags, clusters, **kw) -> tuple[float, float, float]:
    """A share (the mean of 0/1 ``flags``) and its interval: `mean_interval` of booleans."""
    return mean_interval(np.asarray(flags, dtype=float), clusters, **kw)


def describe(mean: float, low: float, high: float, digits: int = 1, percent: bool = False) -> str:
    """``4.9 [4.5, 5.3]`` (or ``61% [57%, 65%]``) for the summary lines; "none" where there is no value."""
    if not np.isfinite(mean):
        return "none"
    if percent:
        return f"{mean:.0%} [{low:.0%}, {high:.0%}]" if np.isfinite(low) else f"{mean:.0%}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]" if np.isfinite(low) else f"{mean:.{digits}f}"
