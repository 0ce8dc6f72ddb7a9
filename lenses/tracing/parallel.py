"""Reading on several processes (data parallel): under ``torchrun``, each process traces its share of the texts
and every process gets the merged table, in the order one process would have made it.

The shares are balanced by tokens, not by count (longest text first, each to the process with the fewest tokens
so far; ties to the lower rank), so every process knows every share without talking. A process group that is not
initialized (one process, the default) makes all of this a no-op.
"""

from __future__ import annotations

import pandas as pd
import torch


def group() -> tuple[int, int]:
    """``(rank, world size)`` of the initialized process group, or ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shares(lengths: list[int], world: int) -> list[list[int]]:
    """The indices of the texts each of ``world`` processes takes, balanced by ``lengths`` (tokens)."""
    load, out = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += lengths[i]
    return [sorted(s) for s in out]


def mine(lengths: list[int]) -> list[int] | None:
    """This process's share of texts of ``lengths`` tokens, or None in a single process (all of them)."""
    rank, world = group()
    return None if world == 1 else shares(lengths, world)[rank]


def merged(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Every process's ``frame`` concatenated and sorted by ``by`` (stable), on every process; ``attrs``
    counters (ints) are summed, other attrs kept from this process."""
    rank, world = group()
    if world == 1:
        return frame
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, frame)
    out = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else frame
    out = out.sort_values(by, kind="stable").reset_index(drop=True)
    out.attrs = dict(frame.attrs)
    for key, value in frame.attrs.items():
        if isinstance(value, int):
            out.attrs[key] = sum(int(p.attrs.get(key, 0)) for p in parts)
    return out


def idle_note(n_texts: int) -> str | None:
    """A note when there are more processes than texts (some trace nothing; the table is still whole)."""
    _, world = group()
    if world > n_texts:
        return (f"note: {world} processes for {n_texts} text(s): {world - n_texts} process(es) had no text to trace "
                "(the table is whole; fewer processes would do)")
    return None


def gathered(value) -> list:
    """Every process's ``value``, in rank order, on every process (``[value]`` in a single process)."""
    if group()[1] == 1:
        return [value]
    import torch.distributed as dist

    parts: list = [None] * group()[1]
    dist.all_gather_object(parts, value)
    return parts


def joined(rows: list) -> list:
    """Every process's list ``rows`` concatenated in rank order, on every process (``rows`` in one process)."""
    return [r for part in gathered(rows) for r in part]


def shared(value):
    """The first process's ``value``, on every process (a collective; ``value`` itself in a single process)."""
    if group()[1] == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if group()[1] > 1:
        torch.distributed.barrier()


def sharded(adapter) -> bool:
    """Whether the model's blocks are sharded over the processes (``--fsdp``: `lenses.jobs.sharding.shard_blocks`),
    so that every forward pass is a collective all processes make together."""
    return hasattr(adapter, "_sharded_fingerprint") and group()[1] > 1


def most_forwards(adapter, mine: int) -> int:
    """With sharded blocks, the number of forward passes the busiest process will make (a collective: every
    process calls it before its first pass); without, ``mine``."""
    if not sharded(adapter):
        return mine
    import torch.distributed as dist

    most = torch.tensor([mine], device=adapter.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())


def even_forwards(adapter, done: int, most: int) -> None:
    """With sharded blocks every process must make as many forward passes as the busiest (each pass gathers every
    block's weights from all processes): this one runs one-token passes from ``done`` up to ``most``."""
    dummy = torch.zeros(1, 1, dtype=torch.long)
    for _ in range(most - done):
        adapter.run_stream(dummy)
