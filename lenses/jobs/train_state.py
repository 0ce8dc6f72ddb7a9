"""`TrainState`: what a training run has learned so far (the lens, the optimizer and scheduler, the step and
the log), built fresh for a config, saved as a checkpoint and loaded back: ``checkpoint.pt`` from one
process, or every process's shard in ``checkpoint.dcp/`` when sharded (`lenses.jobs.sharding`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lenses.base.errors import LensesError
from lenses.base.io import atomic_write
from lenses.jobs import sharding
from lenses.jobs.runs import check_identity, read_checkpoint
from lenses.kinds.lens import Lens, TunedLens
from lenses.model.adapter import ModelAdapter
from lenses.model.loading import DEFAULT_MODEL


@dataclass
class TrainState:
    """What a run has learned so far; saves itself as ``checkpoint.pt`` and loads itself back.

    Generic over the lens: its trainable parameters (whatever a `Lens` subclass registers) are
    optimised on the KL loss through its ``transform_stack``, saved and restored by name. A new
    trainable lens is one class (``train(cfg, lens_class=MyLens)``)."""

    lens: Lens
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: int = 0
    log: list = field(default_factory=list)  # [step, layer, kl] rows
    translator: Any = None  # the FSDP module that runs the lens's translation (`lenses.jobs.sharding`), else None

    @classmethod
    def fresh(cls, cfg, adapter: ModelAdapter, total: int,
              lens_class: type[Lens] = TunedLens, device=None) -> "TrainState":
        """A new lens and optimizer for ``cfg`` (a `lenses.jobs.train.TrainConfig`); sharded with ``cfg.fsdp``."""
        lens = lens_class.for_model(adapter)
        lens.config["model"] = cfg.model or DEFAULT_MODEL
        if not lens.trainable():
            raise LensesError(f"a {lens_class.__name__} has no trainable parameters; nothing to train "
                              "(a transform-only lens needs no training: load or build it directly).")
        translator = sharding.shard(adapter, lens, device) if cfg.fsdp else None  # before the optimizer sees them
        params = lens.trainable()
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=cfg.effective_lr(), momentum=cfg.momentum, nesterov=True,
                                  weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=cfg.effective_lr(), weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
        return cls(lens, opt, sched, translator=translator)

    def translate(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.translator(hidden) if self.translator is not None else self.lens.transform_stack(hidden)

    def save(self, path: Path, identity: dict[str, Any], main: bool = True) -> None:
        """Write the checkpoint: ``checkpoint.pt`` by the main process, or (sharded) every process's
        shard into ``checkpoint.dcp/`` (then all processes must call it)."""
        if self.translator is not None:
            meta = {"step": self.step, "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
                    "identity": identity, "fingerprint": self.lens.config.get("fingerprint"), "log": self.log}
            return sharding.save(path.parent, self.translator, self.optimizer, meta, main)
        if not main:
            return
        state = {
            "step": self.step,
            "lens": {k: v.detach().cpu() for k, v in self.lens.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "identity": identity,
            "fingerprint": self.lens.config.get("fingerprint"),
            "log": self.log,
        }
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    def load(self, path: Path, identity: dict[str, Any]) -> None:
        """Restore from ``path`` after checking it was made by the same run (``identity``)."""
        if self.translator is not None:
            meta = sharding.read_meta(path.parent)
            check_identity(meta["identity"], identity, path)  # the identity holds the model's fingerprint
            sharding.load(path.parent, self.translator, self.optimizer)
            self.scheduler.load_state_dict(meta["scheduler"])
            torch.set_rng_state(meta["rng"])
            self.step, self.log = meta["step"], meta["log"]
            return
        state = read_checkpoint(path, identity)
        self.lens.adapter.check_fingerprint(state["fingerprint"] or {}, what="checkpoint")
        with torch.no_grad():  # checkpoints before generic states held the tuned lens's weight and bias
            tensors = state["lens"] if "lens" in state else {"weight": state["weight"], "bias": state["bias"]}
            self.lens.load_state_dict(tensors)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "rng" in state:
            torch.set_rng_state(state["rng"])
        self.step, self.log = state["step"], state["log"]
