"""Data-parallel probe training across processes, on accelerate's process launcher.

Launched with ``accelerate launch --multi_gpu --num_processes N train_probes.py ...`` (or
``torchrun --nproc_per_node N``), every process holds the model and the lens, takes every N-th
sequence of each global batch, and the translators' gradients are averaged (all-reduce: NCCL on
GPUs, gloo on CPUs) before identical optimizer steps, so all copies of the lens stay equal and the
result matches one process with the same global batch. A single process needs none of this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def main_process() -> bool:
    """Whether this is the process that reports and writes (rank 0 of a launch, or the only one), read from the
    launcher's environment before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class DataParallel:
    rank: int = 0
    world: int = 1
    device: torch.device | None = None  # this process's device when launched on several GPUs

    @classmethod
    def from_env(cls, device: str | None = None) -> "DataParallel":
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        cpu = (device or "").startswith("cpu") or not torch.cuda.is_available()
        state = PartialState(cpu=cpu)
        return cls(state.process_index, state.num_processes, None if cpu else state.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This process's share of a global batch: rows rank, rank + world, ..."""
        return rows[self.rank :: self.world]

    def mean_(self, *tensors: torch.Tensor) -> None:
        """Average tensors over processes, in place."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t)
            t.div_(self.world)

    def sum_(self, *tensors: torch.Tensor) -> None:
        """Add tensors over processes, in place."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t)

    def any(self, flag: bool) -> bool:
        """True if ``flag`` is true in any process (keeps a stop request in step everywhere)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([float(flag)], device=self.device or "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Rebuild the global batch from every process's `shard` (in the global order)."""
        if self.world == 1:
            return local
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.contiguous())
        return torch.stack(parts, dim=1).reshape(-1, *local.shape[1:])

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
