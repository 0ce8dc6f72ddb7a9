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

from lenses.base.io import write_csv
from lenses.base.outdir import claim, read_mark
from lenses.jobs.train import TrainConfig, train
from lenses.text.frequency import FrequencyVariant

DEFAULT_VARIANTS: dict[str, FrequencyVariant] = {
    "baseline": FrequencyVariant(),
    # the paper's control: 1000x fewer updates for the single most frequent token
    "subsample-top1": FrequencyVariant(topk=1, keep_prob=1e-3),
    # a smooth alternative: loss weight count^-0.5
    "inverse-sqrt-freq": FrequencyVariant(alpha=0.5),
}


def probe_bias_experiment(cfg: TrainConfig, variants: dict[str, FrequencyVariant] | None = None, model=None,
                          tokenizer=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train each variant into ``cfg.out/<name>`` (continuing partial or finished ones), then write and
    return ``bucket_shares.csv`` and ``heldout_kl.csv`` in ``cfg.out``. (The CLI adds ``probe_bias.png``.)"""
    variants = variants or DEFAULT_VARIANTS
    out = Path(cfg.out)
    with claim(out, "experiment", resumable=False):  # it continues its variants' runs itself
        if model is None:
            model, tokenizer, _ = cfg.load()
        shares, kls = [], []
        for name, variant in variants.items():
            folder = out / name
            if read_mark(folder).get("state") == "finished" and not cfg.overwrite:  # trained by an earlier run
                print(f"note: variant {name} was trained by an earlier run; reading its tables from {folder}")
                buckets, table = pd.read_csv(folder / "eval_top1_buckets.csv"), pd.read_csv(folder / "eval.csv")
            else:
                run = replace(cfg, out=str(folder), variant=variant, variant_name=name,
                              resume=not cfg.overwrite, overwrite=cfg.overwrite)
                result = train(run, model=model, tokenizer=tokenizer)
                buckets, table = result.buckets, result.eval
            shares.append(buckets.assign(variant=name))
            kls.append(table.assign(variant=name))
        shares_df = pd.concat(shares, ignore_index=True)[["variant", "lens", "layer", "bucket", "share"]]
        kl_df = pd.concat(kls, ignore_index=True)[["variant", "lens", "layer", "kl_nats", "kl_bits_per_byte"]]
        write_csv(out / "bucket_shares.csv", shares_df)
        write_csv(out / "heldout_kl.csv", kl_df)
    return shares_df, kl_df
