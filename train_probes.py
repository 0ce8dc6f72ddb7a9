#!/usr/bin/env python
"""Train a tuned lens (per-layer affine translators) for a causal LM.

    python train_probes.py --out runs/demo                       # default model + corpus
    python train_probes.py --model path/or/file.gguf --corpus texts/ --max-tokens 500000 --out runs/x
    python train_probes.py --out runs/demo --resume              # continue an interrupted run
    python train_probes.py --freq-topk 1 --freq-keep-prob 1e-3 --out runs/control   # a reweighted variant
    python train_probes.py --experiment probe-bias --out runs/bias  # baseline vs variants, same tokens

Writes the lens (config.json + translators.safetensors), training_log.csv, eval.csv (held-out
per-layer KL of the logit lens vs the tuned lens) and checkpoint.pt into --out.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from lenses.cli import run_cli
from lenses.experiment import probe_bias_experiment
from lenses.frequency import FrequencyVariant
from lenses.train import TrainConfig, train


def parse_args(argv=None) -> tuple[TrainConfig, bool, str | None]:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder, cached hub id or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--corpus", default=None, help=".txt/.jsonl file, folder, or save_to_disk dataset (default: Python docs prose)")
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"training tokens (default {d.max_tokens})")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --max-tokens)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=d.optimizer)
    p.add_argument("--lr", type=float, default=None, help="sgd: 1.0, scaled by (1 - momentum); adam: 1e-3")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction)
    p.add_argument("--max-eval-tokens", type=int, default=d.max_eval_tokens)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--chunk-rows", type=int, default=d.chunk_rows,
                   help="rows of the vocab-sized buffer (default: by dtype and vocabulary size; memory and speed)")
    p.add_argument("--compute-dtype", default=d.compute_dtype, help="auto (measured), float32 or bfloat16")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--layers", default=None, help="dotted path of the decoder layers, if not found (e.g. model.layers)")
    p.add_argument("--final-norm", default=None, help="dotted path of the final norm, if not found (e.g. model.norm)")
    p.add_argument("--unembed", default=None, help="dotted path of the unembedding, if not found (e.g. lm_head)")
    p.add_argument("--model-dtype", default=d.model_dtype, help="float32 (default), bfloat16 or float16")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    f = p.add_argument_group("frequency-reweighted variants (all neutral by default = baseline)")
    f.add_argument("--freq-alpha", type=float, default=0.0, help="loss weight count^-alpha")
    f.add_argument("--freq-topk", type=int, default=1, help="the k most frequent tokens for the two options below")
    f.add_argument("--freq-topk-weight", type=float, default=1.0, help="loss factor for top-k positions")
    f.add_argument("--freq-keep-prob", type=float, default=1.0, help="keep top-k positions with this probability")
    f.add_argument("--freq-type-cap", type=int, default=None, help="at most this many positions per token per batch")
    f.add_argument("--freq-token", choices=["teacher", "next", "input"], default="teacher",
                   help="a position's token: the final layer's top-1 (default), the next token, or the input token")
    f.add_argument("--frequencies", default=None, help="token counts file (default: counted on the training data)")
    f.add_argument("--variant-name", default=None, help="label recorded in the lens config")
    p.add_argument("--experiment", choices=["probe-bias"], default=None,
                   help="train baseline + frequency variants on the same tokens and compare them")
    a = p.parse_args(argv)
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(a).items() if k in names and k != "variant_name"})
    cfg.progress = not a.no_progress
    cfg.variant = FrequencyVariant(a.freq_alpha, a.freq_topk, a.freq_topk_weight, a.freq_keep_prob,
                                   a.freq_type_cap, a.freq_token)
    cfg.variant_name = a.variant_name or ("baseline" if cfg.variant.neutral else "reweighted")
    return cfg, a.resume, a.experiment


def main(argv=None) -> int:
    cfg, resume, experiment = parse_args(argv)
    if experiment == "probe-bias":
        shares, _ = probe_bias_experiment(cfg)
        top = shares[(shares.bucket == "1-10") & (shares.lens == "tuned")]
        print("\nshare of top-1 predictions in frequency ranks 1-10 (tuned lens), by layer:")
        print(top.pivot(index="layer", columns="variant", values="share").to_string(float_format=lambda v: f"{v:.2f}"))
        print(f"\nwrote {cfg.out}/bucket_shares.csv, heldout_kl.csv, probe_bias.png")
        return 0
    train(cfg, resume=resume)
    table = __import__("pandas").read_csv(f"{cfg.out}/eval.csv")
    wide = table.pivot(index="layer", columns="lens", values="kl_nats")
    print("\nheld-out KL(final || lens), nats per token:")
    print(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"\nlens written to {cfg.out} (load with TunedLens.from_pretrained({cfg.out!r}, model=model))")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
