"""The probe-bias experiment (Gupta et al. 2025, arXiv 2510.18871, control probe): do early layers
favour frequent tokens only because the probe was trained mostly on them?

Trains the baseline and frequency-reweighted tuned lenses on exactly the same token stream (same
seed, same data order), then compares per layer the share of top-1 predictions in each frequency
bucket and the held-out KL each variant pays.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from .frequency import FrequencyVariant
from .io import write_csv
from .models import load_model
from .plots import plot_probe_bias
from .train import CHECKPOINT_NAME, TrainConfig, train

DEFAULT_VARIANTS: dict[str, FrequencyVariant] = {
    "baseline": FrequencyVariant(),
    # the paper's control: 1000x fewer updates for the single most frequent token
    "subsample-top1": FrequencyVariant(topk=1, keep_prob=1e-3),
    # a smooth alternative: loss weight count^-0.5
    "inverse-sqrt-freq": FrequencyVariant(alpha=0.5),
}


def probe_bias_experiment(
    cfg: TrainConfig, variants: dict[str, FrequencyVariant] | None = None, model=None, tokenizer=None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train each variant into ``cfg.out/<name>`` (resuming finished or partial ones), then write
    ``bucket_shares.csv``, ``heldout_kl.csv`` and ``probe_bias.png`` into ``cfg.out``."""
    variants = variants or DEFAULT_VARIANTS
    out = Path(cfg.out)
    if model is None:
        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
    shares, kls = [], []
    for name, variant in variants.items():
        run = replace(cfg, out=str(out / name), variant=variant, variant_name=name)
        done = (out / name / "eval.csv").exists()
        if not done:
            train(run, resume=(out / name / CHECKPOINT_NAME).exists(), model=model, tokenizer=tokenizer)
        shares.append(pd.read_csv(out / name / "eval_top1_buckets.csv").assign(variant=name))
        kls.append(pd.read_csv(out / name / "eval.csv").assign(variant=name))
    shares_df = pd.concat(shares)[["variant", "lens", "layer", "bucket", "share"]]
    kl_df = pd.concat(kls)[["variant", "lens", "layer", "kl_nats", "kl_bits_per_byte"]]
    write_csv(out / "bucket_shares.csv", shares_df)
    write_csv(out / "heldout_kl.csv", kl_df)
    plot_probe_bias(shares_df, kl_df, out / "probe_bias.png")
    return shares_df, kl_df
