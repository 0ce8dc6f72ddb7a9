"""Interventions along lens directions: at each scored position, act on ``hidden[l]`` along the direction the
lens reads as a token (`Lens.directions`) and run the model on.

- ``ablate``: project out the direction of the model's own final top-1 token; measured: the drop of the
  model's final log-probability of that token, and how often its top-1 changes.
- ``steer``: add ``alpha ||h||`` along the unit direction of the model's runner-up token (or of
  ``--steer-token``, one token for every position); measured: how often the final top-1 becomes that token,
  and the gain of its log-probability.

Each against a control of the same size along a random direction (``...-random``). Every scored position is
edited at once (its own direction), at every second-or-so layer (``--act-layers``); intervals by text block.
A lens the model cannot act along (a non-affine lens, a Jacobian lens's absent layers) is named and skipped.
"""

from __future__ import annotations

import pandas as pd
import torch

from lenses.analysis.common import Usage, ViewResult, prefix_note, text_blocks
from lenses.base.errors import LensesError
from lenses.causal.edits import per_row, project_out_rows, random_units, spaced_layers, unit_rows
from lenses.causal.sites import Sites, row
from lenses.pages.acting_figures import plot_metrics
from lenses.text import convention

SEQ_LEN = 32  # short blocks: more texts for the intervals
PANELS = [("logprob_drop", "ablate the top-1 token's direction", "drop of its final log-prob (nats)"),
          ("top1_changed", "ablation changes the final top-1", "share of positions"),
          ("flipped", "steer toward a token", "share whose top-1 becomes it")]


def _edits(h: torch.Tensor, top: torch.Tensor, runner: torch.Tensor, rand: torch.Tensor, alpha: float) -> dict:
    """name -> per-row edit of the states ``h`` [N, d] at the sites."""
    size = alpha * h.norm(dim=-1, keepdim=True)
    return {"ablate": project_out_rows(top), "ablate-random": project_out_rows(rand),
            "steer": lambda x: x + size.to(x) * runner.to(x), "steer-random": lambda x: x + size.to(x) * rand.to(x)}


def _measure(lens_name, layer, kind, sites, log_q, t1, t2, seed) -> list[dict]:
    base, n = sites.log_p, torch.arange(len(t1))
    if kind.startswith("ablate"):
        metrics = {"logprob_drop": base[n, t1] - log_q[n, t1], "top1_changed": (log_q.argmax(-1) != t1).float()}
    else:
        metrics = {"flipped": (log_q.argmax(-1) == t2).float(), "logprob_gain": log_q[n, t2] - base[n, t2]}
    return [row(lens_name, layer, kind, m, v.cpu().numpy(), sites.texts, seed) for m, v in metrics.items()]


def interventions_view(adapter, tokenizer, lenses: dict, texts: list[str], num_positions: int = 192,
                       num_layers: int = 8, alpha: float = 0.5, steer_token: str | None = None, seed: int = 0,
                       progress: bool = False,
                       batch_size: int = 1, source: str = "the texts given") -> ViewResult:
    from tqdm.auto import tqdm

    toward = None if steer_token is None else convention.single_token(tokenizer, steer_token)
    chosen, blocks, available, first = text_blocks(texts, tokenizer, SEQ_LEN, num_positions, seed, "interventions")
    sites = Sites.of_blocks(adapter, blocks[sorted(chosen)], first, num_positions)
    t1, t2 = sites.log_p.topk(2, dim=-1).indices.unbind(-1)
    if toward is not None:
        t2 = torch.full_like(t1, toward)
    layers, rows, skipped = spaced_layers(adapter.num_layers, num_layers), [], []
    for name, lens in lenses.items():
        for layer in tqdm(layers, desc=f"interventions ({name})", disable=not progress):
            try:
                top, runner = (unit_rows(lens.directions(layer, t).vectors) for t in (t1, t2))
            except LensesError as e:
                skipped.append(f"{name} at layer {layer}: {e}")
                continue
            rand = random_units(len(t1), adapter.d_model, seed + layer)
            for kind, fn in _edits(sites.hidden[layer], top, runner, rand, alpha).items():
                with torch.no_grad():
                    log_q = sites.edited_log_p(adapter, {layer: per_row(sites.index, fn)})
                rows += _measure(name, layer, kind, sites, log_q, t1, t2, seed)
    table = pd.DataFrame(rows)
    usage = Usage("positions", num_positions, available, len(t1), source, prefix_note(tokenizer))
    summary = _summary(table) + [f"no directions for {s}" for s in skipped[:3]]
    settings = {"alpha": alpha, "toward": steer_token or "each position's runner-up"}
    return ViewResult("interventions", {"effects": table}, summary, settings, usage=[usage])


def _summary(table: pd.DataFrame) -> list[str]:
    lines = []
    for lens, part in table.groupby("lens", sort=False):
        drop = part[part.metric == "logprob_drop"].pivot(index="layer", columns="condition", values="value")
        flip = part[part.metric == "flipped"].pivot(index="layer", columns="condition", values="value")
        if drop.empty:
            continue
        mid = drop.index[len(drop) // 2]
        control = drop.loc[mid, "ablate-random"]
        lines.append(f"{lens} lens: ablating its top-1 direction drops the final log-prob by "
                     f"{drop.loc[mid, 'ablate']:.2f} nats at layer {mid} (random {control:.2f}); "
                     f"steering flips to the steered token on {flip.loc[mid, 'steer']:.0%} there "
                     f"(random {flip.loc[mid, 'steer-random']:.0%})")
    return lines


def run(ctx) -> ViewResult:
    texts, source = ctx.view_texts
    cfg = ctx.cfg
    return interventions_view(*ctx.parts, texts, cfg.act_positions, cfg.act_layers, cfg.steer_alpha,
                              cfg.steer_token, **ctx.sampling, source=source)


def plot(result: ViewResult, path):
    return plot_metrics(result.tables["effects"], PANELS, path,
                        f"interventions along lens directions (steer alpha {result.settings['alpha']} toward "
                        f"{result.settings['toward']})")
