"""Sharded lens training (``--fsdp``) on PyTorch FSDP2, with sharded checkpoints.

Under ``torchrun --nproc_per_node N train_probes.py --fsdp ...`` (or ``accelerate launch``):

- `shard` puts every decoder block of the (frozen) model and the lens's translators under
  ``torch.distributed.fsdp.fully_shard``: each process holds 1/N of every block's weights and of the
  translators (split along the layer dimension), their gradients and the optimizer state, and gathers
  a block or the translators only while it runs them. The embeddings, final norm and unembedding stay
  whole on every process (every layer is decoded through them). The lens is float32 whatever the model
  dtype: that is the master copy; bfloat16 hidden states are cast up as they enter it.
- Gradients are averaged over processes by FSDP's reduce-scatter, so N processes with the same global
  batch give the result of one (tests/test_sharding.py).
- `save` / `load` write and read ``checkpoint.dcp/`` with ``torch.distributed.checkpoint``: every
  process writes its own shard, nobody gathers the lens, and a checkpoint written by N processes
  resumes on any number of processes (the shards are re-cut on load). The folder is replaced
  atomically (written beside, then renamed), so a kill at any moment leaves the last whole one.
- `full_state` gathers the lens once, at the end, for the usual lens folder and the evaluation.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from lenses.base.errors import CorruptFileError, LensesError
from lenses.base.io import TMP_SUFFIX, _record

CHECKPOINT = "checkpoint.dcp"
META = "meta.pt"
OWNED = ("*.distcp", ".metadata", META)  # the files a sharded checkpoint holds (lenses.base.outdir: ours)


class Translator(nn.Module):
    """The lens's translation of every layer as one module call, so that FSDP gathers the translators
    before it runs and frees them after (``forward`` = ``lens.transform_stack``)."""

    def __init__(self, lens: nn.Module):
        super().__init__()
        self.lens = lens

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lens.transform_stack(h)


def check_launch(prog: str = "train_probes.py", quantize: str | None = None) -> None:
    """``--fsdp`` needs processes started by a distributed launcher (say the command if they were not) and
    plain weights to shard (a ``--quantize``d model's weights are torchao tensors FSDP cannot split)."""
    if quantize:
        raise LensesError(f"--fsdp shards plain weights over processes, and --quantize {quantize} makes them "
                          "quantized tensors that cannot be sharded: use one of the two (--fsdp spreads the memory "
                          "too).")
    if "WORLD_SIZE" not in os.environ:
        raise LensesError(f"--fsdp shards over processes started by a distributed launcher; run it as "
                          f"`torchrun --nproc_per_node N {prog} ... --fsdp` (N processes; 1 works too).")


def shard_blocks(adapter, device: torch.device | None = None, prog: str = "train_probes.py"):
    """Shard every decoder block of the (frozen) model over all processes (FSDP2); return the device mesh.
    A block's weights are gathered while it runs, forward and backward, and freed after."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():  # one process under torchrun: the data-parallel layer made no group
        check_launch(prog)
        dist.init_process_group("nccl" if device is not None and device.type == "cuda" else "gloo")
    mesh = init_device_mesh("cuda" if device is not None and device.type == "cuda" else "cpu",
                            (dist.get_world_size(),))
    adapter._sharded_fingerprint = adapter.fingerprint()  # its probes read whole weights
    for block in adapter.layers:
        fully_shard(block, mesh=mesh)
    return mesh


def shard(adapter, lens: nn.Module, device: torch.device | None = None) -> Translator:
    """Shard the model's blocks and ``lens`` over all processes (FSDP2); return the module to call."""
    from torch.distributed.fsdp import fully_shard

    mesh = shard_blocks(adapter, device)
    translator = Translator(lens)
    fully_shard(translator, mesh=mesh)
    return translator


def local_bytes(tensors) -> int:
    """Bytes this process holds of ``tensors`` (its shard of a DTensor, all of a plain tensor)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def human(n: float) -> str:
    """``16896`` -> ``16.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} GiB"


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return local_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())


def save(folder: Path, translator: Translator, optimizer, meta: dict, main: bool) -> None:
    """Every process writes its shard of the lens and optimizer state into ``folder/checkpoint.dcp``;
    the main one adds ``meta`` (step, scheduler, log, identity). Collective: all processes call it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = folder / CHECKPOINT
    tmp = folder / f".{CHECKPOINT}{TMP_SUFFIX}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    lens_state, optim_state = get_state_dict(translator, optimizer)
    dcp.save({"lens": lens_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    if main:
        torch.save(meta, tmp / META)
    dist.barrier()
    if main:
        _swap_in(tmp, final)
    dist.barrier()


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace the folder ``final`` by ``tmp``: a kill at any moment leaves either the old whole folder or
    the new one."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    for f in final.iterdir():
        _record(f)


def save_rank_files(final: Path, name: str, write, main: bool) -> None:
    """Every process writes its own file (``write(path)``) into a new folder that replaces ``final`` once
    all have written: the files of one folder always belong to the same moment of the run. Collective."""
    import torch.distributed as dist

    tmp = final.with_name(f".{final.name}{TMP_SUFFIX}")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    write(tmp / name.format(rank=dist.get_rank()))
    dist.barrier()
    if main:
        _swap_in(tmp, final)
    dist.barrier()


def read_meta(folder: Path) -> dict:
    """The main process's ``meta`` of ``folder/checkpoint.dcp`` (to check before loading any tensor)."""
    try:
        return torch.load(folder / CHECKPOINT / META, weights_only=False)
    except Exception as e:
        raise CorruptFileError(f"sharded checkpoint {folder / CHECKPOINT} is incomplete or corrupt "
                               f"({type(e).__name__}); pass --overwrite to start afresh.") from e


def load(folder: Path, translator: Translator, optimizer) -> None:
    """Read ``folder/checkpoint.dcp`` into this process's shards, whatever number of processes wrote it
    (the shards are re-cut). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = folder / CHECKPOINT
    lens_state, optim_state = get_state_dict(translator, optimizer)
    state = {"lens": lens_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(translator, optimizer, model_state_dict=state["lens"], optim_state_dict=state["optimizer"])


def full_state(lens: nn.Module) -> dict[str, torch.Tensor]:
    """The whole lens on every process (collective: all processes call it), as plain CPU tensors."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
            for k, v in lens.state_dict().items()}


def block_bytes(adapter) -> tuple[int, int]:
    """``(bytes of the decoder blocks' weights this process holds, bytes of all of them)``: a sharded block's
    parameters are DTensors whose local part is this process's shard."""
    mine = whole = 0
    for block in adapter.layers:
        for p in block.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            mine += local.numel() * local.element_size()
            whole += p.numel() * p.element_size()
    return mine, whole


def shard_for_reading(adapter, device: torch.device | None = None) -> str:
    """``--fsdp`` for the views: shard the blocks (`shard_blocks`; the lenses, final norm and unembedding stay whole
    on every process) and say what this process holds."""
    import torch.distributed as dist

    shard_blocks(adapter, device, prog="analyze.py")
    mine, whole = block_bytes(adapter)
    return (f"fsdp: process {dist.get_rank()} of {dist.get_world_size()} holds {human(mine)} of the blocks' "
            f"{human(whole)}")
