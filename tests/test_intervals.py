"""The bootstrap by text (`lenses.tracing.intervals`): tested as a procedure, on simulated data with known truth."""

from __future__ import annotations

import numpy as np

from lenses.tracing.intervals import describe, difference_interval, mean_interval, share_interval


def _clustered(rng, mu: float, texts: int = 40, between: float = 1.0, within: float = 1.0):
    """Positions of ``texts`` texts (5-30 each): value = mu + the text's own offset + noise."""
    sizes = rng.integers(5, 31, texts)
    labels = np.repeat(np.arange(texts), sizes)
    values = mu + rng.normal(0, between, texts)[labels] + rng.normal(0, within, len(labels))
    return values, labels


def test_95_percent_intervals_cover_the_true_mean_93_to_97_percent_of_the_time():
    rng = np.random.default_rng(2026)
    hits = 0
    for k in range(200):
        values, labels = _clustered(rng, mu=3.0)
        _, lo, hi = mean_interval(values, labels, replicates=1000, seed=k)
        hits += lo <= 3.0 <= hi
    assert 0.93 <= hits / 200 <= 0.97, hits


def test_clustered_data_get_a_wider_interval_than_the_naive_per_position_one():
    rng = np.random.default_rng(7)
    values, labels = _clustered(rng, mu=0.0)
    _, lo, hi = mean_interval(values, labels)
    naive = 2 * 1.96 * values.std(ddof=1) / np.sqrt(len(values))  # positions taken as independent
    assert hi - lo > 1.5 * naive


def test_one_value_per_text_matches_the_closed_form_standard_error():
    rng = np.random.default_rng(3)
    values = rng.normal(5, 2, 400)
    mean, lo, hi = mean_interval(values, np.arange(400))
    assert mean == values.mean()
    closed = 2 * 1.96 * values.std(ddof=0) / np.sqrt(400)
    assert abs((hi - lo) - closed) < 0.1 * closed


def test_nan_values_are_left_out_and_the_seed_fixes_the_interval():
    values = np.array([1.0, np.nan, 3.0, 2.0, np.nan, 6.0])
    labels = np.array([0, 0, 1, 1, 2, 2])
    mean, lo, hi = mean_interval(values, labels, seed=1)
    assert mean == np.nanmean(values)
    assert (mean, lo, hi) == mean_interval(values, labels, seed=1)
    assert mean_interval([1.0, 2.0], [0, 0])[1:] != mean_interval([1.0, 2.0], [0, 0])[1:]  # one text: NaN, NaN


def test_a_paired_difference_cancels_what_the_texts_share():
    rng = np.random.default_rng(11)
    values, labels = _clustered(rng, mu=0.0, between=3.0)
    diff, lo, hi = difference_interval(values + 1.0, labels, values, labels)
    assert np.isclose(diff, 1.0) and np.isclose(lo, 1.0) and np.isclose(hi, 1.0)  # the same texts on both sides
    # two groups of positions within the same texts: the text offsets cancel, the interval is narrow
    other = values + 0.5 + rng.normal(0, 0.1, len(values))
    _, lo2, hi2 = difference_interval(other, labels, values, labels)
    _, lo_a, hi_a = mean_interval(other, labels)
    assert lo2 < 0.5 < hi2 and hi2 - lo2 < 0.2 * (hi_a - lo_a)


def test_shares_and_their_description():
    flags = np.array([True, False, True, True] * 25)
    share, lo, hi = share_interval(flags, np.repeat(np.arange(25), 4))
    assert share == 0.75 and lo <= 0.75 <= hi
    assert describe(share, lo, hi, percent=True).startswith("75% [")
    assert describe(4.94, 4.51, 5.33) == "4.9 [4.5, 5.3]"
