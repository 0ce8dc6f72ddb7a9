"""Layer-by-layer predictions for a prompt, as a tidy table.

This is the first piece of tracing: decode every position at every layer with one or more
lenses and keep the top-k tokens. Hidden states are decoded one layer at a time, so memory is
O(positions x vocab), never O(layers x positions x vocab).
"""

from __future__ import annotations

import pandas as pd
import torch

from .models import ModelAdapter


def layer_predictions(
    adapter: ModelAdapter,
    tokenizer,
    text: str,
    lenses: dict,
    k: int = 1,
    positions: list[int] | None = None,
) -> pd.DataFrame:
    """Top-``k`` tokens of each lens at each layer (0..L) and position of ``text``.

    Columns: lens, layer, position, input_token, rank, token, token_id, prob.
    ``positions`` (default: all) may use negative indices, e.g. ``[-1]`` for the last position.
    """
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    n = ids.shape[1]
    keep = sorted({p % n for p in positions}) if positions is not None else list(range(n))
    hidden = adapter.hidden_states(ids)[:, 0, keep]  # [L+1, P, d]
    inputs = [tokenizer.decode([int(ids[0, p])]) for p in keep]
    rows = []
    with torch.no_grad():
        for name, lens in lenses.items():
            for layer in range(adapter.num_layers + 1):
                probs = torch.softmax(lens(hidden[layer], layer).float(), dim=-1)
                top = probs.topk(k, dim=-1)
                for j, pos in enumerate(keep):
                    for r in range(k):
                        tid = int(top.indices[j, r])
                        rows.append(
                            {
                                "lens": name,
                                "layer": layer,
                                "position": pos,
                                "input_token": inputs[j],
                                "rank": r + 1,
                                "token": tokenizer.decode([tid]),
                                "token_id": tid,
                                "prob": float(top.values[j, r]),
                            }
                        )
    return pd.DataFrame(rows)
