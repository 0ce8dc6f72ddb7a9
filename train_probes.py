#!/usr/bin/env python
"""Train a tuned lens (per-layer affine translators) for a causal LM.

    python train_probes.py --out runs/demo                       # default model + corpus
    python train_probes.py --model path/or/file.gguf --corpus texts/ --max-tokens 500000 --out runs/x
    python train_probes.py --out runs/demo --resume              # continue an interrupted run

Writes the lens (config.json + translators.safetensors), training_log.csv, eval.csv (held-out
per-layer KL of the logit lens vs the tuned lens) and checkpoint.pt into --out.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from lenses.cli import run_cli
from lenses.train import TrainConfig, train


def parse_args(argv=None) -> tuple[TrainConfig, bool]:
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
    p.add_argument("--chunk-rows", type=int, default=d.chunk_rows, help="rows of the vocab-sized buffer (memory)")
    p.add_argument("--compute-dtype", default=d.compute_dtype, help="auto (measured), float32 or bfloat16")
    p.add_argument("--device", default=d.device)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a = p.parse_args(argv)
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(a).items() if k in names})
    cfg.progress = not a.no_progress
    return cfg, a.resume


def main(argv=None) -> int:
    cfg, resume = parse_args(argv)
    train(cfg, resume=resume)
    table = __import__("pandas").read_csv(f"{cfg.out}/eval.csv")
    wide = table.pivot(index="layer", columns="lens", values="kl_nats")
    print("\nheld-out KL(final || lens), nats per token:")
    print(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"\nlens written to {cfg.out} (load with TunedLens.from_pretrained({cfg.out!r}, model=model))")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
