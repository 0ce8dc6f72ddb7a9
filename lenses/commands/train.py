"""Train a tuned lens (per-layer affine translators) for a causal LM.

    python train_probes.py --out runs/demo                       # default model + corpus
    python train_probes.py --model path/or/file.gguf --corpus texts/ --max-tokens 500000 --out runs/x
    python train_probes.py --out runs/demo --resume              # continue an interrupted run
    python train_probes.py --freq-topk 1 --freq-keep-prob 1e-3 --out runs/control   # a reweighted variant
    python train_probes.py --experiment probe-bias --out runs/bias  # baseline vs variants, same tokens

Writes into --out: the lens (config.json + translators.safetensors), training_log.csv (step, layer,
kl), eval.csv (held-out per-layer KL of the logit lens vs the tuned lens), eval_top1_buckets.csv
(top-1 predictions by token-frequency bucket), token_frequencies.safetensors, eval_kl.png and
checkpoint.pt. --out must be new, empty, or a folder of an earlier run (--resume / --overwrite).
Ctrl-C or SIGTERM saves a checkpoint at the next step; add --resume to continue.

A Jacobian lens is fitted by `lenses fit` (lenses/commands/fit.py); ``--method jacobian`` here still
runs it, with a deprecation note, for one release.
"""

from __future__ import annotations

import sys

from lenses.base.options import Parser, add_options, from_args
from lenses.commands import fit as fit_command
from lenses.jobs.distributed import main_process
from lenses.jobs.experiment import probe_bias_experiment
from lenses.jobs.train import TrainConfig, train
from lenses.pages.plots import plot_heldout_kl, plot_probe_bias
from lenses.text.frequency import FrequencyVariant

GROUPS = {"model": "model", "recipe": "training recipe (must match on --resume)", "runtime": "running"}


METHODS = ("tuned", "jacobian")


def _method(argv) -> str:
    first = Parser(prog="train", add_help=False)
    first.add_argument("--method", choices=METHODS, default="tuned")
    return first.parse_known_args(argv)[0].method


DEPRECATED = "note: --method jacobian is deprecated and goes in the next release; run `lenses fit` (same options)"


def parse_args(argv=None, prog: str = "train_probes.py") -> tuple[TrainConfig, str | None]:
    p = Parser(description=__doc__, prog=prog)
    p.add_argument("--method", choices=METHODS, default="tuned",
                   help="tuned: per-layer affine translators trained on KL; jacobian: deprecated, = lenses fit")
    add_options(p, TrainConfig, GROUPS)
    add_options(p, FrequencyVariant, {"*": "frequency-reweighted variants (all neutral by default = baseline)"},
                prefix="freq_")
    p.add_argument("--experiment", choices=["probe-bias"], default=None,
                   help="train baseline + frequency variants on the same tokens and compare them (default: none)")
    a = p.parse_args(argv)
    return from_args(TrainConfig, a, variant=from_args(FrequencyVariant, a, prefix="freq_")), a.experiment


def main(argv=None, prog: str = "train_probes.py") -> int:
    """``train_probes.py`` / ``lenses train``: parse ``argv``, train (or fit) and report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if _method(argv) == "jacobian":
        print(DEPRECATED, file=sys.stderr)
        rest = [x for i, x in enumerate(argv) if x != "--method" and (i == 0 or argv[i - 1] != "--method")]
        return fit_command.main([x for x in rest if x != "--method=jacobian"], prog=prog)
    cfg, experiment = parse_args(argv, prog)
    if experiment == "probe-bias":
        shares, kl = probe_bias_experiment(cfg)
        plot_probe_bias(shares, kl, f"{cfg.out}/probe_bias.png")
        top = shares[(shares.bucket == "1-10") & (shares.lens == "tuned")]
        print("\nshare of top-1 predictions in frequency ranks 1-10 (tuned lens), by layer:")
        print(top.pivot(index="layer", columns="variant", values="share").to_string(float_format=lambda v: f"{v:.2f}"))
        print(f"\nwrote {cfg.out}/bucket_shares.csv, heldout_kl.csv, probe_bias.png")
        return 0
    result = train(cfg)
    if not main_process():
        return 0
    tokens = result.lens.config["training"]["train_tokens"]
    plot_heldout_kl(result.eval, f"{cfg.out}/eval_kl.png", title=f"held-out KL, {tokens:,} training tokens")
    fit_command.print_heldout_kl(result.eval)
    print(f"\nlens written to {cfg.out} (load with lenses.load_lens({cfg.out!r}, model))")
    return 0

