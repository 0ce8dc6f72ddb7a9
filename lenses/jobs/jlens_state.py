"""The state of a Jacobian-lens fit: the running sums of one process, saved after every prompt in the
reference's checkpoint format (plus our fields), so ``--resume`` continues exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lenses.base.errors import LensesError
from lenses.base.io import atomic_write
from lenses.jobs.runs import read_checkpoint
from lenses.kinds.jacobian import REFERENCE_OFFSET


@dataclass
class FitState:
    """The running sums of one process; saved in the reference's checkpoint format (plus our fields).
    Sharded (``--fsdp``), a process holds only the rows ``rows`` of the sums, over every process's prompts."""

    layers: list[int]
    sums: torch.Tensor  # [n_layers, rows, d] float32 (float64 for a float64 model)
    n_done: int = 0
    next_idx: int = 0  # the next prompt index (of this process's share) to fit
    log: list = field(default_factory=list)  # [prompt, n_done, seconds, rel_change (max over layers), dist_identity]
    rows: torch.Tensor | None = None  # the output dimensions this process holds (None: all of them)

    def add(self, J: torch.Tensor, count: int = 1, allsum=None) -> tuple[float, float]:
        """Add ``J`` (the sum of ``count`` prompts' ``J_p``, at this state's rows); return the running mean's
        relative change (max over layers) and its mean distance from the identity (relative Frobenius
        norms). ``allsum`` adds a tensor over the processes (sharded: each holds some rows)."""
        old = self.sums / self.n_done if self.n_done else None
        self.sums += J
        self.n_done += count
        mean = self.sums / self.n_done
        d = mean.shape[-1]
        eye = torch.eye(d, dtype=mean.dtype)
        eye = eye if self.rows is None else eye[self.rows]
        squares = torch.stack([(mean - old if old is not None else torch.zeros_like(mean)).flatten(1).pow(2).sum(1),
                               mean.flatten(1).pow(2).sum(1), (mean - eye).flatten(1).pow(2).sum(1)])
        if allsum is not None:
            squares = allsum(squares)
        change, size, off = squares.sqrt()
        rel = float((change / size.clamp_min(1e-30)).max()) if old is not None else math.inf
        return rel, float((off / math.sqrt(d)).mean())

    def save(self, path: Path, identity: dict, target_layer: int, skip_first: int) -> None:
        atomic_write(path, lambda tmp: torch.save(self.payload(identity, target_layer, skip_first), tmp))

    def payload(self, identity: dict, target_layer: int, skip_first: int) -> dict:
        payload = {"n_done": self.n_done, "next_idx": self.next_idx,
                   "source_layers": [k - REFERENCE_OFFSET for k in self.layers], "target_layer": target_layer,
                   "skip_first": skip_first, "identity": identity, "log": self.log,
                   "sums_dtype": str(self.sums.dtype).removeprefix("torch.")}
        if self.rows is not None:  # a shard: some rows of every layer's sum (not the reference's format)
            return payload | {"lenses_rows": self.rows.clone(), "lenses_sum_rows": self.sums.clone()}
        payload["jacobian_sum"] = {k - REFERENCE_OFFSET: self.sums[j].float().clone()
                                   for j, k in enumerate(self.layers)}
        if self.sums.dtype == torch.float64:  # keep float64 fits exact across a resume
            payload["lenses_sum_float64"] = self.sums.clone()
        return payload

    def load(self, path: Path, identity: dict) -> None:
        payload = read_checkpoint(path, identity)
        if self.rows is not None:
            if not torch.equal(payload.get("lenses_rows", torch.empty(0)), self.rows):
                raise LensesError(f"{path} holds other rows than this process's; resume with the same number of "
                                  "processes and --dim-batch.")
            self.sums.copy_(payload["lenses_sum_rows"])
        elif "lenses_sum_float64" in payload:
            self.sums.copy_(payload["lenses_sum_float64"])
        else:
            for j, k in enumerate(self.layers):
                self.sums[j] = payload["jacobian_sum"][k - REFERENCE_OFFSET]
        self.n_done, self.next_idx, self.log = payload["n_done"], payload["next_idx"], payload["log"]
