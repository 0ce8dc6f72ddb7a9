"""Token frequencies, reweighting variants, and the probe-bias experiment on a tiny model."""

from collections import Counter

import pandas as pd
import pytest
import torch
from tiny_models import tiny_adapter, tiny_model

from lenses import TunedLens
from lenses.jobs.experiment import probe_bias_experiment
from lenses.jobs.train import lens_kl_backward, train
from lenses.text.frequency import BUCKET_NAMES, FrequencyVariant, TokenFrequencies, bucket_shares


def test_counts_ranks_and_buckets_match_an_independent_count(char_tokenizer):
    text = "the cat sat on the mat; the end. " * 3 + "zebra"
    ids = char_tokenizer(text).input_ids
    freqs = TokenFrequencies.from_tokens(torch.tensor(ids), vocab_size=96)
    counter = Counter(ids)
    assert all(int(freqs.counts[t]) == c for t, c in counter.items())
    assert int(freqs.counts.sum()) == len(ids)
    # rank 1 = most frequent, ties by lower id: rebuild with a plain sort
    expected_order = sorted(range(96), key=lambda t: (-counter.get(t, 0), t))
    ranks = freqs.ranks
    assert [int(ranks[t]) for t in expected_order] == list(range(1, 97))
    buckets = freqs.bucket(torch.tensor(expected_order))
    assert buckets[:10].eq(0).all() and buckets[10:96].eq(1).all()


def test_save_load_round_trip(tmp_path):
    freqs = TokenFrequencies(torch.tensor([5, 0, 3, 9]))
    freqs.save(tmp_path)
    assert torch.equal(TokenFrequencies.load(tmp_path).counts, freqs.counts)


def _freqs():
    counts = torch.tensor([1000, 100, 10, 1, 50, 500], dtype=torch.long)
    return TokenFrequencies(counts)


def test_inverse_frequency_weights_have_mean_one_and_follow_frequency():
    tokens = torch.tensor([0, 1, 2, 3, 4, 5, 0, 0])
    w = FrequencyVariant(alpha=0.5).weights(tokens, _freqs(), torch.Generator().manual_seed(0))
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    by_count = sorted(range(6), key=lambda t: int(_freqs().counts[t]))  # rare first
    w_of = {int(t): float(w[i]) for i, t in enumerate(tokens)}
    assert [w_of[t] for t in by_count] == sorted(w_of.values(), reverse=True)
    assert w_of[0] / w_of[3] == pytest.approx((1000 / 1) ** -0.5, rel=1e-5)


def test_topk_factor():
    tokens = torch.tensor([0, 5, 1, 2])
    w = FrequencyVariant(topk=2, topk_weight=0.1).weights(tokens, _freqs(), torch.Generator().manual_seed(0))
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert w[0] == w[1] and w[2] == w[3] and w[0] / w[2] == pytest.approx(0.1)


def test_subsampling_keeps_the_expected_fraction():
    n = 20_000
    tokens = torch.zeros(n, dtype=torch.long)  # all positions carry the most frequent token
    tokens[: n // 2] = 3  # half carry a rare one, never dropped
    w = FrequencyVariant(topk=1, keep_prob=0.2).weights(tokens, _freqs(), torch.Generator().manual_seed(1))
    kept_frequent = (w[n // 2 :] > 0).float().mean().item()
    assert kept_frequent == pytest.approx(0.2, abs=0.02)  # binomial sd ~0.006: 3 sd tolerance
    assert (w[: n // 2] > 0).all()
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)


def test_type_cap():
    tokens = torch.tensor([0] * 10 + [1] * 3 + [2])
    w = FrequencyVariant(type_cap=2).weights(tokens, _freqs(), torch.Generator().manual_seed(0))
    kept = Counter(int(t) for t, wi in zip(tokens, w) if wi > 0)
    assert kept == {0: 2, 1: 2, 2: 1}


def test_unit_weights_equal_no_weights_bit_for_bit(eager_kl):
    adapter = tiny_adapter("llama")
    hidden = adapter.hidden_states(torch.randint(1, 96, (2, 8))).flatten(1, 2)
    grads = []
    for weights in (None, torch.ones(16)):
        lens = TunedLens.for_model(adapter)
        lens_kl_backward(lens, hidden, weights, torch.float32, chunk_rows=9)
        grads.append((lens.weight.grad, lens.bias.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def _cfg(tmp_path, **kw):
    from test_training import _cfg as base

    return base(tmp_path, **kw)


def test_neutral_variant_reproduces_baseline_and_reweighting_changes_it(tmp_path, char_tokenizer, eager_kl):
    model = tiny_model("llama")
    base = train(_cfg(tmp_path / "a", steps=4), model=model, tokenizer=char_tokenizer).lens
    neutral = train(_cfg(tmp_path / "b", steps=4, variant=FrequencyVariant(topk=3, token="input")),
                    model=model, tokenizer=char_tokenizer).lens
    assert torch.equal(base.weight, neutral.weight) and torch.equal(base.bias, neutral.bias)
    other = train(_cfg(tmp_path / "c", steps=4, variant=FrequencyVariant(alpha=1.0, token="input")),
                  model=model, tokenizer=char_tokenizer).lens
    assert not torch.equal(base.weight, other.weight)
    assert other.config["variant"]["alpha"] == 1.0
    assert (tmp_path / "c" / "run" / "token_frequencies.safetensors").exists()


def test_probe_bias_experiment_end_to_end(tmp_path, char_tokenizer, eager_kl):
    cfg = _cfg(tmp_path, steps=3)
    variants = {"baseline": FrequencyVariant(), "control": FrequencyVariant(topk=1, keep_prob=1e-3)}
    shares, kl = probe_bias_experiment(cfg, variants, model=tiny_model("llama"), tokenizer=char_tokenizer)
    sums = shares.groupby(["variant", "lens", "layer"]).share.sum()
    assert ((sums - 1).abs() < 1e-9).all()
    assert set(shares.bucket) <= set(BUCKET_NAMES) and set(shares.layer) == {0, 1, 2, 3}
    assert set(kl.variant) == {"baseline", "control"}
    pd.testing.assert_frame_equal(shares.reset_index(drop=True), pd.read_csv(tmp_path / "run" / "bucket_shares.csv"),
                                  check_exact=False, rtol=1e-12)
    # a second call re-uses the finished runs (resume) and returns the same tables
    again, _ = probe_bias_experiment(cfg, variants, model=tiny_model("llama"), tokenizer=char_tokenizer)
    pd.testing.assert_frame_equal(again, shares)


def test_bucket_shares_against_hand_count():
    freqs = TokenFrequencies(torch.arange(2000, 0, -1))  # token t has rank t+1
    top1 = torch.tensor([[0, 5, 50, 500, 1500], [9, 10, 99, 100, 1000]])
    df = bucket_shares(top1, freqs).pivot(index="layer", columns="bucket", values="share")
    assert df.loc[0, "1-10"] == pytest.approx(0.4) and df.loc[0, "1001+"] == pytest.approx(0.2)
    assert df.loc[1, "1-10"] == pytest.approx(0.2) and df.loc[1, "11-100"] == pytest.approx(0.4)
    assert df.loc[1, "101-1000"] == pytest.approx(0.2) and df.loc[1, "1001+"] == pytest.approx(0.2)


def test_cli_flags_build_the_variant():
    from lenses.commands import train as train_probes

    cfg, experiment = train_probes.parse_args(
        ["--freq-topk", "1", "--freq-keep-prob", "1e-3", "--freq-token", "next", "--out", "x"]
    )
    assert cfg.variant == FrequencyVariant(topk=1, keep_prob=1e-3, token="next")
    assert cfg.label() == "reweighted" and not cfg.resume and experiment is None
    cfg, _ = train_probes.parse_args(["--out", "x"])
    assert cfg.variant.neutral and cfg.label() == "baseline"


def test_position_tokens_sources():
    from lenses.jobs.train import position_tokens

    adapter = tiny_adapter("llama")
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(5))
    hidden = adapter.hidden_states(ids).flatten(1, 2)
    with torch.no_grad():
        final_top1 = adapter.model(input_ids=ids).logits.argmax(-1)  # the model's own top-1, [2, 5]
    assert torch.equal(position_tokens("input", adapter, ids, hidden), ids.reshape(-1))
    assert torch.equal(position_tokens("teacher", adapter, ids, hidden), final_top1.reshape(-1))
    expected_next = torch.cat([ids[:, 1:], final_top1[:, -1:]], dim=1).reshape(-1)
    assert torch.equal(position_tokens("next", adapter, ids, hidden), expected_next)
