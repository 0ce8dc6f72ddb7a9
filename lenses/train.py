"""Training tuned-lens translators: minimise sum over layers of KL(final || lens), model frozen.

The recipe defaults follow the tuned-lens paper/package (Belrose et al. 2023): SGD with
Nesterov momentum 0.9, lr 1.0 scaled by (1 - momentum), weight decay 1e-3, linear decay to 0,
no warm-up, gradient-norm clip 1.0. Each step:

1. one frozen model forward collects the residual stream ``[L+1, tokens, d]``;
2. all translators run as one batched matmul, then the final norm (autograd tracks this part);
3. KL and its gradient w.r.t. the normalised states are formed chunk by chunk
   (`lenses.kl.kl_and_grad`), so no ``[layers x tokens x vocab]`` tensor ever exists;
4. one backward through norm + translators, clip, optimiser step.

Everything that decides a step (data order, weights) is a function of (seed, step), and
checkpoints hold the optimiser state, so ``--resume`` continues bit-identically.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .data import make_blocks, read_texts
from .distributed import DataParallel
from .frequency import FrequencyVariant, TokenFrequencies, bucket_shares
from .errors import CorruptFileError, LensesError
from .io import atomic_write, ensure_writable, write_csv
from .kl import Teacher, default_chunk_rows, kl_and_grad, kl_rows, teacher_top1
from .lens import LogitLens, TunedLens
from .models import DEFAULT_MODEL, ModelAdapter, load_model
from .precision import compute_dtype

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in the lens config and the checkpoint)."""

    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct)
    corpus: str | None = None  # None: the default corpus (Python documentation prose)
    out: str = "runs/lens"
    seq_len: int = 256
    batch_size: int = 8  # sequences per step
    max_tokens: int | None = 200_000  # training tokens (steps = max_tokens // (batch_size * seq_len))
    steps: int | None = None  # overrides max_tokens
    optimizer: str = "sgd"  # sgd (tuned-lens recipe) or adam
    lr: float | None = None  # sgd: 1.0 (times 1 - momentum); adam: 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float = 1.0
    seed: int = 0
    eval_fraction: float = 0.1
    max_eval_tokens: int = 4096
    checkpoint_every: int = 10  # steps
    chunk_rows: int | None = None  # rows of the [rows x vocab] buffer (None: lenses.kl.default_chunk_rows)
    compute_dtype: str = "auto"
    device: str = "cpu"
    model_dtype: str = "float32"  # dtype the model's weights are loaded in
    layers: str | None = None  # dotted paths of the model's parts, when the adapter cannot find them
    final_norm: str | None = None
    unembed: str | None = None
    progress: bool = True
    variant: FrequencyVariant = field(default_factory=FrequencyVariant)  # frequency reweighting
    variant_name: str = "baseline"
    frequencies: str | None = None  # counts file; default: counted on the training blocks

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def total_steps(self) -> int:
        if self.steps is not None:
            return max(1, self.steps)
        if self.max_tokens is None:
            raise LensesError("give --steps or --max-tokens")
        return max(1, self.max_tokens // self.tokens_per_step)

    def effective_lr(self) -> float:
        if self.optimizer == "sgd":
            return (1.0 if self.lr is None else self.lr) * (1 - self.momentum)
        return 1e-3 if self.lr is None else self.lr


# --------------------------------------------------------------------------- one step


def _blocks(start: int, stop: int, size: int):
    """(start, end) of consecutive blocks of ``size`` covering ``range(start, stop)``."""
    return [(s, min(stop, s + size)) for s in range(start, stop, size)]


def lens_kl_backward(
    lens: TunedLens,
    hidden: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_rows: int | None = None,
    teacher_positions: int = 256,
) -> torch.Tensor:
    """Accumulate into ``lens``'s grads the gradient of sum_l mean_pos(w * KL_l); return KL [L, N].

    ``hidden``: ``[L+1, N, d]`` residual stream (positions flattened); ``pos_weight``: [N] or None.
    The teacher is decoded ``teacher_positions`` at a time; the lens in chunks of about
    ``chunk_rows`` rows (all layers x a few positions): see `lenses.kl` for why both are small.
    """
    adapter = lens.adapter
    L, N = lens.num_layers, hidden.shape[1]
    chunk_rows = chunk_rows or default_chunk_rows(adapter, dtype)
    u = adapter.final_norm(lens.translate_all(hidden[:L]))  # [L, N, d], tracked by autograd
    grad_u = torch.empty_like(u)
    kl = torch.empty(L, N, device=hidden.device)
    w_all = torch.full((N,), 1.0 / N, device=hidden.device) if pos_weight is None else pos_weight / N
    for b0, b1 in _blocks(0, N, teacher_positions):
        teacher = Teacher(adapter, hidden[L, b0:b1])
        for s, e in _blocks(b0, b1, max(1, chunk_rows // L)):
            p, neg_h = teacher.rows(s - b0, e - b0)
            kl[:, s:e], grad_u[:, s:e] = kl_and_grad(adapter, u[:, s:e].detach(), p, neg_h, w_all[s:e], dtype)
    u.backward(grad_u)
    return kl


def heldout_stats(
    adapter: ModelAdapter,
    lenses: dict[str, Any],
    blocks: torch.Tensor,
    batch_size: int = 8,
    chunk_rows: int | None = None,
    dtype: torch.dtype = torch.float32,
    teacher_positions: int = 256,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per lens: ``kl`` [L] mean KL(final || lens) per layer, and ``top1`` [L+1, N] the lens's
    top-1 token at every layer and position of ``blocks`` (row L: the model's own top-1)."""
    L = adapter.num_layers
    chunk_rows = chunk_rows or default_chunk_rows(adapter, dtype)
    sums = {name: torch.zeros(L, dtype=torch.float64) for name in lenses}
    top1: dict[str, list[torch.Tensor]] = {name: [] for name in lenses}
    count = 0
    with torch.no_grad():
        for b in range(0, len(blocks), batch_size):
            hidden = adapter.hidden_states(blocks[b : b + batch_size])
            hidden = hidden.flatten(1, 2)
            for b0, b1 in _blocks(0, hidden.shape[1], teacher_positions):
                teacher = Teacher(adapter, hidden[L, b0:b1])
                final = teacher.top1[None]  # [1, P]
                ids = {name: [] for name in lenses}
                for s, e in _blocks(b0, b1, max(1, chunk_rows // L)):
                    h = hidden[:L, s:e]
                    for name, lens in lenses.items():
                        t = lens.translate_all(h) if isinstance(lens, TunedLens) else h
                        kl, top = kl_rows(adapter, adapter.final_norm(t), *teacher.rows(s - b0, e - b0), dtype)
                        sums[name] += kl.sum(-1).double().cpu()
                        ids[name].append(top)
                for name in lenses:
                    top1[name].append(torch.cat([torch.cat(ids[name], dim=1), final]).cpu())
            count += hidden.shape[1]
    return {name: {"kl": sums[name] / count, "top1": torch.cat(top1[name], dim=1)} for name in lenses}


def per_layer_kl(adapter: ModelAdapter, lenses: dict[str, Any], blocks: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    """Mean KL(final || lens) per layer [L] over all positions of ``blocks``, for each lens."""
    return {name: stats["kl"] for name, stats in heldout_stats(adapter, lenses, blocks, **kw).items()}


def eval_table(adapter, lenses: dict[str, Any], blocks: torch.Tensor, tokenizer, stats=None, **kw) -> pd.DataFrame:
    """Held-out per-layer KL in nats per token and in bits per byte, tidy (layer, lens, ...)."""
    stats = stats or heldout_stats(adapter, lenses, blocks, **kw)
    kl = {name: s["kl"] for name, s in stats.items()}
    n_bytes = sum(len(tokenizer.decode(row).encode("utf-8")) for row in blocks.tolist())
    tokens_per_byte = blocks.numel() / max(1, n_bytes)
    rows = []
    for name, values in kl.items():
        for layer, v in enumerate(values.tolist()):
            rows.append(
                {"layer": layer, "lens": name, "kl_nats": v, "kl_bits_per_byte": v * tokens_per_byte / math.log(2)}
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the loop


def _batch_indices(step: int, batch_size: int, n_blocks: int, seed: int) -> torch.Tensor:
    """Blocks of ``step``: walk through per-epoch permutations seeded by (seed, epoch)."""
    perms: dict[int, torch.Tensor] = {}
    out = []
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(g, n_blocks)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perms[epoch][pos]))
    return torch.tensor(out)


def _make_optimizer(cfg: TrainConfig, lens: TunedLens, total: int):
    params = [lens.weight, lens.bias]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            params, lr=cfg.effective_lr(), momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
        )
    elif cfg.optimizer == "adam":
        opt = torch.optim.AdamW(params, lr=cfg.effective_lr(), weight_decay=cfg.weight_decay)
    else:
        raise LensesError(f"unknown optimizer {cfg.optimizer!r}: use sgd or adam")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
    return opt, sched


def _save_checkpoint(path: Path, step: int, lens, opt, sched, cfg, log_rows) -> None:
    state = {
        "step": step,
        "weight": lens.weight.detach().cpu(),
        "bias": lens.bias.detach().cpu(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "config": asdict(cfg),
        "fingerprint": lens.config.get("fingerprint"),
        "log": log_rows,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(path: Path, cfg: TrainConfig) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptFileError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}). Delete it to start over."
        ) from e
    saved = state["config"]
    for key in ("model", "corpus", "seq_len", "batch_size", "seed", "optimizer", "lr", "momentum", "weight_decay",
                "variant", "frequencies"):
        now = asdict(cfg)[key]
        if saved.get(key) != now:
            raise LensesError(
                f"cannot resume: the checkpoint in {path.parent} was made with {key}={saved.get(key)!r}, "
                f"now {key}={now!r}. Use the same settings, or another --out to start afresh."
            )
    return state


class _stop_on_sigint:
    """Turn the first Ctrl-C into a request to stop at the next step boundary (checkpointed);
    a second Ctrl-C interrupts at once (the last periodic checkpoint still holds)."""

    def __enter__(self):
        self.requested = False
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handle)
        return lambda: self.requested

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        return False


def train(cfg: TrainConfig, resume: bool = False, model=None, tokenizer=None) -> TunedLens:
    """Train a tuned lens and write it, its training log and its held-out evaluation to ``cfg.out``.

    Outputs: ``config.json`` + ``translators.safetensors`` (the lens), ``training_log.csv``
    (step, layer, kl), ``eval.csv`` (layer, lens, kl_nats, kl_bits_per_byte), ``checkpoint.pt``.
    """
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME
    if ckpt_path.exists() and not resume:
        raise LensesError(f"{out} already holds a training run: pass --resume to continue it, or another --out.")
    ensure_writable(out)
    torch.manual_seed(cfg.seed)
    dp = DataParallel.from_env(cfg.device)
    if cfg.batch_size % dp.world:
        raise LensesError(f"--batch-size {cfg.batch_size} does not split evenly over {dp.world} processes; "
                          f"use a multiple of {dp.world}.")
    if model is None:
        model, tokenizer = load_model(cfg.model, device=dp.device or cfg.device, dtype=cfg.model_dtype)
    adapter = ModelAdapter.from_model(model, layers=cfg.layers, final_norm=cfg.final_norm, unembed=cfg.unembed)
    dtype = compute_dtype(cfg.compute_dtype, adapter.device)

    texts = read_texts(cfg.corpus)
    max_eval_blocks = max(1, cfg.max_eval_tokens // cfg.seq_len)
    train_blocks, eval_blocks = make_blocks(texts, tokenizer, cfg.seq_len, cfg.eval_fraction, max_eval_blocks)
    total = cfg.total_steps()
    if cfg.frequencies:
        freqs = TokenFrequencies.load(cfg.frequencies)
    else:
        freqs = TokenFrequencies.from_tokens(train_blocks, adapter.vocab_size)

    lens = TunedLens.for_model(adapter)
    lens.config["model"] = cfg.model or DEFAULT_MODEL
    opt, sched = _make_optimizer(cfg, lens, total)
    start, log_rows = 0, []
    if resume and ckpt_path.exists():
        state = _load_checkpoint(ckpt_path, cfg)
        adapter.check_fingerprint(state["fingerprint"] or {}, what="checkpoint")
        with torch.no_grad():
            lens.weight.copy_(state["weight"])
            lens.bias.copy_(state["bias"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, log_rows = state["step"], state["log"]

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, unit="step", disable=not (cfg.progress and dp.main), desc="training")
    t0, tokens_done = time.perf_counter(), 0
    with _stop_on_sigint() as stop_requested:
        for step in range(start, total):
            idx = _batch_indices(step, cfg.batch_size, len(train_blocks), cfg.seed)
            mine = dp.shard(idx)  # all of idx in a single process
            hidden = adapter.hidden_states(train_blocks[mine]).flatten(1, 2)
            weights = None
            if not cfg.variant.neutral:  # weights are normalised over the global batch, as in one process
                tokens = _position_tokens(cfg.variant.token, adapter, train_blocks[mine], hidden)
                tokens = dp.gather_rows(tokens.view(len(mine), -1).to(hidden.device)).reshape(-1).cpu()
                rng = torch.Generator().manual_seed(cfg.seed * 7919 + step)  # resumable: a function of step
                weights = cfg.variant.weights(tokens, freqs, rng)
                weights = dp.shard(weights.view(len(idx), -1)).reshape(-1).to(hidden.device)
            opt.zero_grad(set_to_none=True)
            kl = lens_kl_backward(lens, hidden, weights, dtype, cfg.chunk_rows)
            layer_kl = kl.mean(1)
            dp.mean_(lens.weight.grad, lens.bias.grad, layer_kl)
            if not (torch.isfinite(lens.weight.grad).all() and torch.isfinite(lens.bias.grad).all()):
                raise LensesError(
                    f"non-finite gradient at step {step} (NaN/inf in hidden states or loss, e.g. fp16 overflow). "
                    "Load the model in float32 or bfloat16 (--model-dtype) or lower --lr, then resume (--resume)."
                )
            torch.nn.utils.clip_grad_norm_([lens.weight, lens.bias], cfg.clip)
            opt.step()
            sched.step()
            layer_kl = layer_kl.tolist()
            log_rows += [[step, layer, v] for layer, v in enumerate(layer_kl)]
            tokens_done += hidden.shape[1] * dp.world
            rate = tokens_done / (time.perf_counter() - t0)
            bar.set_postfix(kl=f"{sum(layer_kl) / len(layer_kl):.3f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            if dp.any(stop_requested()):
                if dp.main:
                    _save_checkpoint(ckpt_path, step + 1, lens, opt, sched, cfg, log_rows)
                bar.close()
                raise LensesError(
                    f"interrupted after step {step + 1} of {total}; progress saved in {ckpt_path}. "
                    "Continue with the same command plus --resume."
                )
            if (step + 1) % cfg.checkpoint_every == 0 and dp.main:
                _save_checkpoint(ckpt_path, step + 1, lens, opt, sched, cfg, log_rows)
    bar.close()
    train_seconds = time.perf_counter() - t0
    if not dp.main:  # the other processes hold the same lens; the main one evaluates and writes
        dp.barrier()
        return lens
    _save_checkpoint(ckpt_path, total, lens, opt, sched, cfg, log_rows)

    lenses = {"logit": LogitLens(adapter), "tuned": lens}
    stats = heldout_stats(adapter, lenses, eval_blocks, batch_size=cfg.batch_size, chunk_rows=cfg.chunk_rows, dtype=dtype)
    table = eval_table(adapter, lenses, eval_blocks, tokenizer, stats=stats)
    buckets = pd.concat([bucket_shares(s["top1"], freqs).assign(lens=name) for name, s in stats.items()])
    lens.config.update(
        training={
            **{k: v for k, v in asdict(cfg).items() if k not in ("out", "progress", "device")},
            "train_tokens": total * cfg.tokens_per_step,
            "eval_tokens": int(eval_blocks.numel()),
            "tokens_per_second": tokens_done / train_seconds if tokens_done else None,
            "compute_dtype_used": str(dtype).replace("torch.", ""),
        },
        variant={"name": cfg.variant_name, **asdict(cfg.variant)},
        heldout_kl_nats=table[table.lens == "tuned"].kl_nats.round(5).tolist(),
    )
    lens.save_pretrained(out)
    write_csv(out / "training_log.csv", pd.DataFrame(log_rows, columns=["step", "layer", "kl"]))
    write_csv(out / "eval.csv", table)
    write_csv(out / "eval_top1_buckets.csv", buckets[["lens", "layer", "bucket", "share"]])
    freqs.save(out)
    from .plots import plot_heldout_kl

    plot_heldout_kl(table, out / "eval_kl.png", title=f"held-out KL, {total * cfg.tokens_per_step:,} training tokens")
    dp.barrier()
    return lens


def _position_tokens(source: str, adapter: ModelAdapter, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The token each position "has" for frequency reweighting: teacher top-1, next or input token."""
    if source == "input":
        return ids.reshape(-1)
    if source == "teacher":
        return teacher_top1(adapter, hidden[-1])
    if source == "next":  # the last position of a block has no next token: use the teacher's top-1
        last = teacher_top1(adapter, hidden[-1].view(*ids.shape, -1)[:, -1])
        return torch.cat([ids[:, 1:], last[:, None].to(ids.device)], dim=1).reshape(-1)
    raise LensesError(f"unknown frequency token source {source!r}: use teacher, next or input")
