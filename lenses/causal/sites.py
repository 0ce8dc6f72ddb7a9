"""Where the views that act on the model edit and score: positions of text blocks, their states and the
model's own distribution there, and one tidy row per measurement with its interval by text."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lenses.causal.edits import run_edited
from lenses.model.intervene import final_logits
from lenses.tracing.intervals import mean_interval


@dataclass
class Sites:
    ids: torch.Tensor  # [B, T] the blocks
    index: tuple[torch.Tensor, torch.Tensor]  # (block, position) of each scored site, N of them
    hidden: torch.Tensor  # [L+1, N, d] the states at the sites
    log_p: torch.Tensor  # [N, V] the model's own next-token log-probabilities there

    @classmethod
    def of_blocks(cls, adapter, ids: torch.Tensor, first: int, num_positions: int) -> "Sites":
        """The positions ``first .. T-2`` of each block in order, the first ``num_positions`` of them."""
        B, T = ids.shape
        b = torch.arange(B).repeat_interleave(T - 1 - first)
        t = torch.arange(first, T - 1).repeat(B)
        b, t = b[:num_positions], t[:num_positions]
        with torch.no_grad():
            hidden = adapter.hidden_states(ids)[:, b, t]
            log_p = final_logits(adapter, ids)[b, t].log_softmax(-1)
        return cls(ids, (b, t), hidden, log_p)

    @property
    def texts(self) -> np.ndarray:
        """The block each site is in (the unit the intervals resample)."""
        return self.index[0].numpy()

    def edited_log_p(self, adapter, edits: dict) -> torch.Tensor:
        """The model's log-probabilities [N, V] at the sites under ``edits`` ({layer: edit of [B, T, d]})."""
        return run_edited(adapter, self.ids, edits)[self.index].log_softmax(-1)


def row(lens: str, layer: int, condition: str, metric: str, values, clusters, seed: int = 0) -> dict:
    """One tidy row: the mean of ``values`` with its 95% bootstrap interval over ``clusters`` (texts)."""
    values = np.asarray(values, dtype=float)
    mean, low, high = mean_interval(values, clusters, seed=seed)
    return {"lens": lens, "layer": layer, "condition": condition, "metric": metric, "value": mean,
            "ci_low": low, "ci_high": high, "n": len(values)}
