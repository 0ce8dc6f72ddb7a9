"""Patchscope view (Ghandeharioun et al. 2024): the last position of ``--prompt`` read at every layer by
patching its state into the identity prompt (`lenses.causal.patchscope`), next to each lens's reading of the
same state. One row per source layer: the patchscope's top tokens and probabilities, and whether each lens's
top-1 is the patchscope's top-1. The prompt is read as the grid reads it (a chat model's user turn through its
chat template, ``--chat-template``); the identity prompt is raw few-shot text, as in the paper."""

from __future__ import annotations

import pandas as pd
import torch

from lenses.analysis.common import Usage, ViewResult
from lenses.causal.patchscope import IDENTITY_PROMPT, patchscope, source_states
from lenses.pages.acting_figures import plot_metrics
from lenses.text.chat import chat_turn

PANELS = [("top1_prob", "patchscope: probability of its top-1", "probability"),
          ("agrees", "the lens's top-1 is the patchscope's", "1 = same token")]


def patchscope_view(adapter, tokenizer, lenses: dict, prompt: str, top_k: int = 5, target: str = IDENTITY_PROMPT,
                    chat: bool = False, system: str | None = None, seed: int = 0, progress: bool = False,
                    batch_size: int = 1) -> ViewResult:
    source = chat_turn(tokenizer, prompt, system).ids if chat else prompt
    states = source_states(adapter, tokenizer, source)
    tops, metrics = [], []
    for layer in range(adapter.num_layers + 1):
        with torch.no_grad():
            probs, _ = patchscope(adapter, tokenizer, states[layer], layer, target)
        p, ids = probs.topk(top_k)
        tops += [{"layer": layer, "rank": r + 1, "token": tokenizer.decode([int(i)]), "token_id": int(i),
                  "prob": float(q)} for r, (q, i) in enumerate(zip(p, ids))]
        for name, lens in lenses.items():
            if not lens.has_layer(layer):
                continue
            with torch.no_grad():
                mine = int(lens(states[layer][None], layer)[0].argmax())
            for metric, value in (("top1_prob", float(p[0])), ("agrees", float(mine == int(ids[0])))):
                metrics.append({"lens": name, "layer": layer, "condition": "patchscope", "metric": metric,
                                "value": value, "ci_low": float("nan"), "ci_high": float("nan"), "n": 1})
    table, top = pd.DataFrame(metrics), pd.DataFrame(tops)
    agree = table[table.metric == "agrees"].groupby("lens", sort=False).value.mean()
    summary = [f"patchscope of {prompt!r} through {target!r}: last-layer top-1 "
               f"{top[(top.layer == adapter.num_layers) & (top['rank'] == 1)].token.iloc[0]!r}"]
    summary += [f"{lens} lens agrees with the patchscope's top-1 at {share:.0%} of layers"
                for lens, share in agree.items()]
    usage = Usage("prompts", 1, 1, 1, "--prompt" + (" (a user turn of the chat template)" if chat else ""))
    return ViewResult("patchscope", {"tokens": top, "agreement": table}, summary, {}, usage=[usage])


def run(ctx) -> ViewResult:
    return patchscope_view(*ctx.parts, ctx.cfg.prompt, ctx.cfg.top_k, chat=ctx.chat[0], system=ctx.cfg.system,
                           **ctx.sampling)


def plot(result: ViewResult, path):
    return plot_metrics(result.tables["agreement"], PANELS, path, "patchscope (identity prompt)")
