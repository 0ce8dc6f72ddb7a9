"""Fit a Jacobian lens (Gurnee et al. 2026) for a causal LM: the corpus-averaged Jacobian of the last block's
output with respect to each layer's residual stream.

    lenses fit --num-prompts 100 --out runs/jlens          # default model + corpus
    lenses fit --model path/or/file.gguf --corpus generated:200 --out runs/x
    lenses fit --out runs/jlens --resume                   # continue an interrupted fit

Writes the lens (config.json + translators.safetensors, and jacobian_lens.pt in the
published format that TransformerLens and the reference code read), convergence.csv and .png (the
running mean's relative change per prompt), eval.csv (held-out KL, logit vs Jacobian lens) and
jacobian_checkpoint.pt (after every prompt; --resume continues exactly). Data-parallel over prompts
under torchrun (each process fits every N-th prompt, as docs/training.md shows); add --fsdp to shard
the model's blocks and the sums over the processes.
"""

from __future__ import annotations


from lenses.base.options import Parser, add_options, from_args
from lenses.jobs.distributed import main_process
from lenses.jobs.jlens_fit import FitConfig, fit
from lenses.pages.plots import plot_convergence, plot_heldout_kl

GROUPS = {"model": "model", "recipe": "fit recipe (must match on --resume)", "runtime": "running"}


def print_heldout_kl(table) -> None:
    """The held-out KL table (``eval.csv``) as a layer x lens table, in nats per token."""
    print("\nheld-out KL(final || lens), nats per token:")
    print(table.pivot(index="layer", columns="lens", values="kl_nats").to_string(float_format=lambda v: f"{v:.3f}"))


def parse_args(argv=None, prog: str = "lenses fit") -> FitConfig:
    p = Parser(description=__doc__, prog=prog)
    add_options(p, FitConfig, GROUPS)
    return from_args(FitConfig, p.parse_args(argv))


def main(argv=None, prog: str = "lenses fit") -> int:
    """``lenses fit``: parse ``argv``, fit and report."""
    cfg = parse_args(argv, prog)
    result = fit(cfg)
    if not main_process():  # the other processes of a data-parallel fit hold the same lens
        return 0
    plot_convergence(result.convergence, f"{cfg.out}/convergence.png")
    if len(result.eval):
        plot_heldout_kl(result.eval, f"{cfg.out}/eval_kl.png",
                        title=f"held-out KL, Jacobian lens of {result.lens.n_prompts} prompts")
        print_heldout_kl(result.eval)
    print(f"\nJacobian lens of {result.lens.n_prompts} prompts written to {cfg.out} (load with "
          f"lenses.load_lens({cfg.out!r}, model); {cfg.out}/jacobian_lens.pt for TransformerLens)")
    return 0
