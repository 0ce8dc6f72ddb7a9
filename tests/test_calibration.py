"""The calibration view: the expected calibration error against closed forms, its interval, and the view's
table against an independent float64 recomputation on a tiny model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import TEXT, byte_tokenizer, random_lens, run_analyze, tiny_inputs, tiny_model

from lenses import LogitLens, ModelAdapter, engine
from lenses.analysis.calibration import bin_columns, calibration_view, ece_of_sums, expected_calibration_error
from lenses.analysis.common import text_blocks
from lenses.tracing.intervals import mean_interval, sums_interval

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_ece_of_a_hand_computed_example():
    # bins of 0.1: [0.05] -> |0 - 0.05|; [0.15] -> |1 - 0.15|; [0.95, 0.95] -> 2 * |0.5 - 0.95|; over 4 positions
    ece = expected_calibration_error([0.05, 0.15, 0.95, 0.95], [0, 1, 1, 0])
    assert ece == pytest.approx((0.05 + 0.85 + 0.9) / 4)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == pytest.approx(0.0)  # the edges fall in a bin


def test_ece_is_near_zero_when_calibrated_and_the_gap_when_over_confident():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 200_000)
    assert expected_calibration_error(conf, rng.uniform(0, 1, conf.size) < conf) < 0.01
    over = np.full(200_000, 0.9)  # says 90%, right 60% of the time: ECE = 0.3
    assert expected_calibration_error(over, rng.uniform(0, 1, over.size) < 0.6) == pytest.approx(0.3, abs=0.01)


def test_sums_interval_of_a_ratio_is_mean_interval():
    """A mean is a statistic of sums (sum of values / count): the two bootstraps draw the same texts."""
    rng = np.random.default_rng(1)
    values, texts = rng.normal(size=300), rng.integers(0, 30, 300)
    cols = np.stack([values, np.ones_like(values)], 1)
    got = sums_interval(cols, texts, lambda t: t[..., 0] / t[..., 1], seed=3)
    np.testing.assert_allclose(got, mean_interval(values, texts, seed=3), rtol=1e-12)
    ece, lo, hi = sums_interval(bin_columns(rng.uniform(size=300), rng.uniform(size=300) < 0.5), texts,
                                ece_of_sums)
    assert lo <= ece <= hi and hi > lo


def test_calibration_view_matches_a_float64_recomputation():
    model = tiny_model("llama", vocab_size=257)
    adapter = ModelAdapter.from_model(model)
    tok = byte_tokenizer()
    lenses = {"logit": LogitLens(adapter), "tuned": random_lens(adapter, scale=0.2)}
    texts = [TEXT]
    result = calibration_view(adapter, tok, lenses, texts, num_positions=90, seq_len=32, seed=4)
    layers = result.tables["layers"]
    assert result.usage[0].used == 90
    chosen, blocks, _, _ = text_blocks(texts, tok, 32, 90, 4, "calibration")
    ids = torch.stack([blocks[b] for b in chosen])  # [3, 32]: 31 positions each, 90 used
    ad64 = ModelAdapter.from_model(tiny_model("llama", vocab_size=257).double())
    with torch.no_grad():
        h = ad64.hidden_states(ids)[:, :, :-1].flatten(1, 2)[:, :90]  # [L+1, 90, d]
        nxt = ids[:, 1:].flatten()[:90]
        tuned = lenses["tuned"].double()
        L = adapter.num_layers
        final = engine.decode(ad64, h[L]).argmax(-1)
        for name in lenses:
            for layer in range(L + 1):
                x = h[layer] if name == "logit" or layer == L else tuned.transform(h[layer], layer)
                p = torch.softmax(engine.decode(ad64, x), -1)
                conf, top = p.max(-1)
                for ref, right in (("final", top == final), ("next", top == nxt)):
                    row = layers[(layers.lens == name) & (layers.layer == layer) & (layers.reference == ref)]
                    want = expected_calibration_error(conf.numpy(), right.numpy())
                    assert row.ece.iloc[0] == pytest.approx(want, abs=1e-5), (name, layer, ref)
                    assert row.accuracy.iloc[0] == pytest.approx(float(right.double().mean()))
                    assert row.n.iloc[0] == 90
    assert (layers[(layers.layer == L) & (layers.reference == "final")].accuracy == 1).all()
    bins = result.tables["bins"]
    assert bins.groupby(["lens", "layer", "reference"]).n.sum().eq(90).all()


def test_calibration_view_from_the_command_line(tmp_path, capsys):
    root = tiny_inputs(tmp_path / "in")
    out = tmp_path / "out"
    proc = run_analyze(["--model", root / "model", "--corpus", root / "corpus.txt", "--lens", "logit", "--view",
                        "calibration", "--num-positions", "40", "--out", out, "--no-progress"], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ECE" in proc.stdout
    table = pd.read_csv(out / "calibration_layers.csv")
    assert {"ece", "ci_low", "ci_high", "reference"} <= set(table.columns)
    assert (out / "calibration.png").stat().st_size > 0
