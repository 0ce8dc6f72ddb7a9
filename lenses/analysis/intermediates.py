"""Intermediate concepts (after the J-lens paper, Gurnee et al. 2026): does a lens read, at the last position
of a two-hop prompt, the concept the model must pass through? "The money used in the country whose capital
city is Tokyo is called the" -> intermediate "Japan" -> answer "Yen".

Items are JSONL ``{"prompt", "answer", "intermediates": [...]}`` (``--items``; default: the shipped 702 made
from the shipped facts by ``scripts/make_intermediates.py``). Each is read as the facts view reads a prompt
(the chat template where the model is read as a chat model), at the position that predicts the answer. Per lens
and layer: pass@k of the intermediate (its first token, with a leading space, within the lens's top k; the
best of the item's intermediates) and of the answer, and the area under pass@k over log k (k = 1, 2, 4, ...,
1024, averaged: 1 = always top-1), each with a 95% interval by item.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lenses.analysis.common import Usage, ViewResult, plain_ids
from lenses.base.errors import DataError
from lenses.causal.sites import row
from lenses.engine import decode
from lenses.pages.acting_figures import plot_metrics
from lenses.text.data import read_utf8
from lenses.tracing.facts_data import fact_items

KS = (1, 5, 10, 50, 100)
AREA_KS = tuple(2 ** j for j in range(11))
PANELS = [("area", "intermediate: area under pass@k over log k", "area (1 = always top-1)"),
          ("pass@10", "intermediate in the top 10", "share of items")]


def default_items_path() -> Path:
    return Path(str(resources.files("lenses") / "datasets" / "intermediates.jsonl"))


def read_items(path: str | Path | None = None) -> list[dict]:
    """The items of a JSONL file; a line without a non-empty prompt, answer and intermediates is named."""
    path = Path(path) if path else default_items_path()
    if not path.is_file():
        raise DataError(f"items file {path} does not exist; pass a JSONL file of {{prompt, answer, intermediates}} "
                        "with --items.")
    items = []
    for n, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not valid JSON ({e.msg}); fix the line.") from e
        missing = [k for k in ("prompt", "answer", "intermediates") if not (isinstance(obj, dict) and obj.get(k))]
        bad = not missing and not (isinstance(obj["intermediates"], list)
                                   and all(isinstance(w, str) and w.strip() for w in obj["intermediates"]))
        if missing or bad:
            what = f"missing or empty {', '.join(missing)}" if missing else "intermediates is not a list of words"
            raise DataError(f"{path}:{n}: {what}; each line is "
                            '{"prompt": "...", "answer": "...", "intermediates": ["..."]}.')
        items.append(obj)
    if not items:
        raise DataError(f"{path} holds no items; each line is {{prompt, answer, intermediates}}.")
    return items


def _ranks(lens, states: torch.Tensor, tokens: list[int]) -> np.ndarray:
    """[L+1, len(tokens)] 0-based ranks of ``tokens`` in the lens's reading of each layer (NaN: no reading); all
    layers decoded in one call (``lens.state`` per layer, then one vocabulary matmul)."""
    present = [layer for layer in range(states.shape[0]) if lens.has_layer(layer)]
    out = np.full((states.shape[0], len(tokens)), np.nan)
    z = decode(lens.adapter, torch.stack([lens.state(states[layer], layer) for layer in present])).float()
    ids = torch.tensor(tokens, device=z.device)
    out[present] = (z[:, None, :] > z[:, ids][:, :, None]).sum(-1).cpu().numpy()
    return out


def intermediates_view(adapter, tokenizer, lenses: dict, items: list[dict], num_items: int | None = None,
                       chat: bool = False, system: str | None = None, seed: int = 0, progress: bool = False,
                       batch_size: int = 1, source: str = "the shipped items") -> ViewResult:
    from tqdm.auto import tqdm

    chosen = sorted(random.Random(seed).sample(range(len(items)), min(num_items or len(items), len(items))))
    picked = [items[i] for i in chosen]
    traced, _ = fact_items(tokenizer, picked, chat, system)
    rows = []
    for i, (item, t) in enumerate(tqdm(list(zip(picked, traced)), desc="intermediates", disable=not progress)):
        ids = torch.tensor([list(t.ids[: t.positions[0] + 1])])
        with torch.no_grad():
            states = adapter.hidden_states(ids)[:, 0, -1]
        words = [plain_ids(tokenizer, " " + w.strip())[0] for w in item["intermediates"]]
        for name, lens in lenses.items():
            with torch.no_grad():
                ranks = _ranks(lens, states, words + [t.targets["answer"][0]])
            for layer in range(len(ranks)):
                rows.append({"item": chosen[i], "lens": name, "layer": layer,
                             "intermediate_rank": np.min(ranks[layer, :-1]), "answer_rank": ranks[layer, -1]})
    ranks = pd.DataFrame(rows)
    usage = Usage("items", num_items, len(items), len(picked), source)
    table = _pass_table(ranks, seed)
    return ViewResult("intermediates", {"ranks": ranks, "passk": table}, _summary(table), {}, usage=[usage])


def _pass_table(ranks: pd.DataFrame, seed: int) -> pd.DataFrame:
    rows = []
    for (lens, layer), part in ranks.groupby(["lens", "layer"], sort=False):
        for role in ("intermediate", "answer"):
            r = part[f"{role}_rank"].to_numpy()
            if np.isnan(r).all():
                continue
            metrics = {f"pass@{k}": (r < k).astype(float) for k in KS}
            metrics["area"] = np.mean([(r < k) for k in AREA_KS], axis=0)
            rows += [row(lens, layer, role, metric, v, part.item.to_numpy(), seed) for metric, v in metrics.items()]
    return pd.DataFrame(rows)


def _summary(table: pd.DataFrame) -> list[str]:
    lines = []
    area = table[(table.metric == "area") & (table.condition == "intermediate")]
    for lens, part in area.groupby("lens", sort=False):
        best = part.loc[part.value.idxmax()]
        top10 = table[(table.lens == lens) & (table.layer == best.layer) & (table.metric == "pass@10")
                      & (table.condition == "intermediate")].value.iloc[0]
        lines.append(f"{lens} lens: the intermediate is read best at layer {int(best.layer)} (area "
                     f"{best.value:.2f} [{best.ci_low:.2f}, {best.ci_high:.2f}]; pass@10 there {top10:.0%})")
    return lines


def run(ctx) -> ViewResult:
    cfg = ctx.cfg
    return intermediates_view(*ctx.parts, read_items(cfg.items), cfg.num_items, **ctx.chat_args, **ctx.sampling,
                              source=cfg.items or "the shipped items (scripts/make_intermediates.py)")


def plot(result: ViewResult, path):
    table = result.tables["passk"]
    return plot_metrics(table[table.condition == "intermediate"], PANELS, path, "intermediate concepts")
