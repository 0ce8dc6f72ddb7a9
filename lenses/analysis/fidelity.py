"""Causal fidelity per lens and layer (Belrose et al. 2023, section 5), and the causal swap benchmark.

- ``alignment``: at the scored positions, find the lens's causal basis at layer ``l`` (the ``--fidelity-k``
  directions whose mean ablation moves the lens's reading most, `lenses.causal.fidelity.causal_basis`), ablate
  it, and compare the change of the lens's distribution at ``l`` (the stimulus) with the change of the model's
  final distribution (the response): their Aitchison cosine per position, and the output KL; against a random
  subspace of the same dimension (``random``). A lens that reads what the model uses scores near 1.
- ``swap``: `lenses.causal.swap` on shipped facts the model answers right: make the lens read another answer of
  the same relation where it read this one (``swap``: the least-norm edit exchanging the two lens logits, the
  lens's next 20 tokens held; ``pair-swap``: the J-lens paper's coordinate exchange); success = the model's final
  top-1 becomes it; the control moves the state as far along a random direction; ``step`` is the edit's size
  relative to the state. At the last layer the swap is the model's own: success there is the identity.
Intervals: by text block (alignment) and by prompt (swap).
"""

from __future__ import annotations

import pandas as pd
import torch

from lenses.analysis.common import Usage, ViewResult, prefix_note, require, text_blocks
from lenses.base.errors import LensesError
from lenses.causal.edits import per_row, remove_subspace, spaced_layers
from lenses.causal.fidelity import aitchison, causal_basis
from lenses.causal.sites import Sites, row
from lenses.causal.swap import SwapPrompt, swap_trial
from lenses.engine import decode
from lenses.pages.acting_figures import plot_metrics
from lenses.tracing.facts_data import fact_items, read_facts

SEQ_LEN = 32  # short blocks: more texts for the intervals
MAX_ITER = 20  # L-BFGS evaluations per basis direction
MAX_TRIES_PER_SWAP = 10  # facts tried per swap prompt asked for
BASIS_POSITIONS = 64  # the causal basis is searched on the first 64 sites, then ablated at all of them
PANELS = [("alignment", "stimulus-response alignment", "Aitchison cosine"),
          ("kl_output", "ablation's effect on the output", "KL (nats)"),
          ("success", "causal swap: final top-1 becomes the new token", "share of prompts")]


def _alignment_rows(adapter, name, lens, layer, sites, k, seed) -> list[dict]:
    h = sites.hidden[layer].float()
    basis = causal_basis(lens, h[:BASIS_POSITIONS], layer, k, mode="mean", max_iter=MAX_ITER)
    g = torch.Generator().manual_seed(seed + layer)
    random = torch.linalg.qr(torch.randn(h.shape[-1], k, generator=g))[0]
    rows = []
    with torch.no_grad():
        lens0 = lens(h, layer).float().log_softmax(-1)
        for condition, A in (("lens", basis.vectors), ("random", random)):
            lens1 = lens(remove_subspace(h, A, "mean", samples=h), layer).float().log_softmax(-1)
            edit = per_row(sites.index, lambda x, A=A: remove_subspace(x, A, "mean", samples=h))
            log_q = sites.edited_log_p(adapter, {layer: edit})
            kl_out = (sites.log_p.exp() * (sites.log_p - log_q)).sum(-1)
            kl_lens = (lens0.exp() * (lens0 - lens1)).sum(-1)
            for metric, v in (("alignment", aitchison(lens0, lens1, sites.log_p, log_q)), ("kl_output", kl_out),
                              ("kl_lens", kl_lens)):
                rows.append(row(name, layer, condition, metric, v.cpu().numpy(), sites.texts, seed))
    return rows


def swap_prompts(adapter, tokenizer, facts: list[dict], num: int, chat: bool, system) -> tuple[list, int]:
    """Up to ``num`` facts the model answers right (its top-1 is the answer's first token), each paired with the
    next fact of its relation whose answer starts with another token; and how many facts were tried (at most
    ``MAX_TRIES_PER_SWAP`` per prompt asked for: a model that knows few facts does not read them all)."""
    items, _ = fact_items(tokenizer, facts, chat, system)
    answers = [item.targets["answer"][0] for item in items]
    relations = [f.get("relation", "") for f in facts]
    prompts, tried = [], 0
    for i, item in enumerate(items):
        if len(prompts) >= num or tried >= MAX_TRIES_PER_SWAP * num:
            break
        tried += 1
        others = [j for j in list(range(i + 1, len(items))) + list(range(i)) if relations[j] == relations[i]
                  and answers[j] != answers[i]]
        ids = torch.tensor([list(item.ids[: item.positions[0] + 1])])
        with torch.no_grad():
            states = adapter.hidden_states(ids)[:, 0, -1]
            right = int(decode(adapter, states[-1]).argmax()) == answers[i]
        if right and others:
            prompts.append(SwapPrompt(ids, answers[i], answers[others[0]], states))
    return prompts, tried


def _swap_rows(adapter, name, lens, layers, prompts, alpha, seed, progress=False) -> list[dict]:
    from tqdm.auto import tqdm

    rows, clusters = [], list(range(len(prompts)))
    for layer in tqdm(layers, desc=f"causal swap ({name})", disable=not progress):
        trials = [swap_trial(adapter, lens, p, layer, alpha, seed=seed + i) for i, p in enumerate(prompts)]
        for condition, key in (("swap", "swap"), ("pair-swap", "pair-swap"), ("swap-random", "control")):
            rows.append(row(name, layer, condition, "success", [t[key] for t in trials], clusters, seed))
        rows.append(row(name, layer, "swap", "step", [t["step"] for t in trials], clusters, seed))
    return rows


def fidelity_view(adapter, tokenizer, lenses: dict, texts: list[str], facts: list[dict], num_positions: int = 192,
                  num_layers: int = 8, k: int = 2, num_swaps: int = 40, alpha: float = 1.0, chat: bool = False,
                  system: str | None = None, seed: int = 0, progress: bool = False, batch_size: int = 1,
                  source: str = "the texts given", facts_source: str = "the shipped facts") -> ViewResult:
    from tqdm.auto import tqdm

    require(k <= adapter.d_model, f"--fidelity-k {k} asks for more directions than the model's {adapter.d_model} "
                                  "dimensions; ask for at most that (a few are the point: 1-4).")
    chosen, blocks, available, first = text_blocks(texts, tokenizer, SEQ_LEN, num_positions, seed, "fidelity")
    sites = Sites.of_blocks(adapter, blocks[sorted(chosen)], first, num_positions)
    prompts, tried = swap_prompts(adapter, tokenizer, facts, num_swaps, chat, system)
    layers, rows, skipped = spaced_layers(adapter.num_layers, num_layers), [], []
    for name, lens in lenses.items():
        usable = []
        for layer in tqdm(layers, desc=f"fidelity ({name})", disable=not progress):
            try:
                lens.affine(layer) if layer < adapter.num_layers else None
            except LensesError as e:
                skipped.append(f"{name} at layer {layer}: {e}")
                continue
            usable.append(layer)
            rows += _alignment_rows(adapter, name, lens, layer, sites, k, seed)
        rows += _swap_rows(adapter, name, lens, usable, prompts, alpha, seed, progress) if prompts else []
    table = pd.DataFrame(rows)
    usage = [Usage("positions", num_positions, available, len(sites.texts), source, prefix_note(tokenizer)),
             Usage("swap prompts (facts the model answers right)", num_swaps, len(facts), len(prompts), facts_source,
                   [f"the first {tried} facts tried, {len(prompts)} answered right"])]
    summary = _summary(table) + [f"skipped {s}" for s in skipped[:3]]
    return ViewResult("fidelity", {"effects": table}, summary, {"k": k}, usage=usage)


def _summary(table: pd.DataFrame) -> list[str]:
    lines = []
    for lens, part in table.groupby("lens", sort=False):
        al = part[(part.metric == "alignment") & (part.condition == "lens")].set_index("layer")
        sw = part[(part.metric == "success") & (part.condition == "swap")].set_index("layer")
        if al.empty:
            continue
        inner = al.drop(al.index.max())
        best = inner.value.idxmax() if len(inner) else al.index.max()
        text = (f"{lens} lens: alignment {al.value.mean():.2f} on average over layers, highest at layer {best} "
                f"({al.value[best]:.2f} [{al.ci_low[best]:.2f}, {al.ci_high[best]:.2f}])")
        if not sw.empty:
            text += f"; swap success {sw.value.iloc[len(sw) // 2]:.0%} at layer {sw.index[len(sw) // 2]}, " \
                    f"{sw.value.iloc[-1]:.0%} at the last"
        lines.append(text)
    return lines


def run(ctx) -> ViewResult:
    texts, source = ctx.view_texts
    cfg = ctx.cfg
    return fidelity_view(*ctx.parts, texts, read_facts(cfg.facts), cfg.act_positions, cfg.act_layers,
                         cfg.fidelity_k, cfg.num_swaps, cfg.swap_alpha, **ctx.chat_args, **ctx.sampling,
                         source=source, facts_source=cfg.facts or "the shipped facts")


def plot(result: ViewResult, path):
    return plot_metrics(result.tables["effects"], PANELS, path,
                        f"causal fidelity (a causal basis of {result.settings['k']} directions) and the swap")
