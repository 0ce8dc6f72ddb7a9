"""Training a tuned lens: minimise sum over layers of KL(final || lens), the model frozen.

The recipe defaults follow the tuned-lens paper/package (Belrose et al. 2023): SGD with Nesterov
momentum 0.9, lr 1.0 scaled by (1 - momentum), weight decay 1e-3, linear decay to 0, no warm-up,
gradient-norm clip 1.0. Each step:

1. one frozen model forward collects the residual stream ``[L+1, tokens, d]``;
2. all translators run as one batched matmul, then the final norm (autograd tracks this part);
3. KL and its gradient w.r.t. the normalised states come from the vocabulary engine chunk by
   chunk (`lenses.engine.kl_and_grad`), so no ``[layers x tokens x vocab]`` tensor ever exists;
4. one backward through norm + translators, clip, optimiser step.

`train` is `lenses.jobs.runs.open_job` (output folder, signals, model), `setup` (data, state), `loop` and
`finish` (held-out evaluation, files) around one `TrainState`, which saves and loads itself.
Everything that decides a step (data order, weights) is a function of (seed, step), and the
checkpoint holds the optimiser state and the identity of the run (recipe, data hash, dtypes), so
``--resume`` continues bit-identically or refuses, listing what changed.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lenses import engine
from lenses.base.errors import DataError, LensesError
from lenses.base.io import write_csv
from lenses.base.outdir import OutputFolder
from lenses.jobs import sharding
from lenses.jobs.distributed import DataParallel
from lenses.jobs.plan import PlanOptions, check_fits
from lenses.jobs.runs import Job, job_corpus, open_job
from lenses.jobs.train_config import TrainConfig, plain
from lenses.jobs.train_state import TrainState
from lenses.kinds.lens import Lens, LogitLens, TunedLens
from lenses.model.adapter import ModelAdapter
from lenses.text import convention, corpora
from lenses.text.data import make_blocks
from lenses.text.frequency import TokenFrequencies, bucket_shares
from lenses.tracing.evaluate import evaluate

CHECKPOINT_NAME = "checkpoint.pt"


# --------------------------------------------------------------------------- one step


def lens_kl_backward(lens, hidden: torch.Tensor, pos_weight: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32, chunk_rows: int | None = None,
                     teacher_positions: int = 256, translate=None) -> torch.Tensor:
    """Accumulate into ``lens``'s grads the gradient of sum_l mean_pos(w * KL_l); return KL [L, N].

    ``hidden``: ``[L+1, N, d]`` residual stream (positions flattened); ``pos_weight``: [N] or None;
    ``translate``: what runs the lens's ``transform_stack`` (the FSDP module when sharded).
    Chunking and the teacher: `lenses.engine.kl_backward`.
    """
    L = lens.num_layers
    translated = (translate or lens.transform_stack)(hidden[:L])
    return engine.kl_backward(lens.adapter, translated, hidden[L], pos_weight, dtype, chunk_rows, teacher_positions)


def batch_indices(step: int, batch_size: int, n_blocks: int, seed: int) -> torch.Tensor:
    """Blocks of ``step``: walk through per-epoch permutations seeded by (seed, epoch)."""
    perms: dict[int, torch.Tensor] = {}
    out = []
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(g, n_blocks)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perms[epoch][pos]))
    return torch.tensor(out)


def position_tokens(source: str, adapter: ModelAdapter, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The token each position "has" for frequency reweighting: teacher top-1, next or input token."""
    if source == "input":
        return ids.reshape(-1)
    if source == "teacher":
        return engine.top1_ids(adapter, hidden[-1])
    if source == "next":  # the last position of a block has no next token: use the teacher's top-1
        last = engine.top1_ids(adapter, hidden[-1].view(*ids.shape, -1)[:, -1])
        return torch.cat([ids[:, 1:], last[:, None].to(ids.device)], dim=1).reshape(-1)
    raise LensesError(f"unknown frequency token source {source!r}: use teacher, next or input")


# --------------------------------------------------------------------------- state


# --------------------------------------------------------------------------- setup, loop, finish


@dataclass
class Run:
    """Everything the loop and the finish need, made by `setup`."""

    cfg: TrainConfig
    adapter: ModelAdapter
    tokenizer: Any
    dp: DataParallel
    dtype: torch.dtype
    train_blocks: torch.Tensor
    eval_blocks: torch.Tensor
    freqs: TokenFrequencies
    state: TrainState
    identity: dict[str, Any]
    folder: OutputFolder | None
    total: int
    seconds: float = 0.0
    tokens: int = 0
    data: dict = field(default_factory=dict)  # how much text the run asked for, had and used (data_accounting)

    @property
    def checkpoint(self) -> Path:
        return Path(self.cfg.out) / (sharding.CHECKPOINT if self.cfg.fsdp else CHECKPOINT_NAME)


@dataclass
class TrainResult:
    """What `train` returns (and writes into ``cfg.out``)."""

    lens: Lens
    log: pd.DataFrame  # step, layer, kl
    eval: pd.DataFrame  # layer, lens, kl_nats, kl_bits_per_byte
    buckets: pd.DataFrame  # lens, layer, bucket, share (top-1 predictions by frequency bucket)
    frequencies: TokenFrequencies
    out: Path


def _hash(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def setup(job: Job, cfg: TrainConfig, lens_class: type[Lens] = TunedLens) -> Run:
    """Read the data and build (or resume) the `TrainState` of a job `open_job` started."""
    dp, adapter, tokenizer = job.dp, job.adapter, job.tokenizer
    dtype = engine.compute_dtype(cfg.compute_dtype, adapter.device)
    texts = job_corpus(job, cfg.corpus, cfg.seed, cfg.progress)
    max_eval_blocks = max(1, cfg.max_eval_tokens // cfg.seq_len)
    _check_seq_len(cfg, adapter)
    train_blocks, eval_blocks = make_blocks(texts, tokenizer, cfg.seq_len, cfg.eval_fraction, max_eval_blocks)
    if cfg.batch_size > len(train_blocks):
        raise DataError(f"--batch-size {cfg.batch_size} is more than the {len(train_blocks)} training blocks of "
                        f"{cfg.seq_len} tokens the corpus gives; lower --batch-size or --seq-len, or add text.")
    total = cfg.total_steps()
    freqs = (TokenFrequencies.load(cfg.frequencies) if cfg.frequencies
             else TokenFrequencies.from_tokens(train_blocks[:, convention.of(tokenizer).first:], adapter.vocab_size))
    if len(freqs.counts) < adapter.vocab_size:
        raise DataError(f"--frequencies covers {len(freqs.counts)} tokens but the model has {adapter.vocab_size}: "
                        "it was counted with another tokenizer. Omit --frequencies to count on the corpus.")
    identity = {"recipe": cfg.recipe(), "total_steps": total, "data": _hash(train_blocks, eval_blocks),
                "frequencies": _hash(freqs.counts), "compute_dtype_used": str(dtype).replace("torch.", ""),
                "fingerprint": adapter.fingerprint(),  # the model itself, wherever its file lies
                "lens_kind": lens_class.kind}
    _check_checkpoint_kind(cfg)
    state = TrainState.fresh(cfg, adapter, total, lens_class, device=dp.device)
    run = Run(cfg, adapter, tokenizer, dp, dtype, train_blocks, eval_blocks, freqs, state, identity, job.folder,
              total, data=data_accounting(cfg, total, train_blocks, eval_blocks, len(texts),
                                          convention.of(tokenizer).first))
    if dp.main:
        print("\n".join(run.data["lines"]))
    if cfg.resume and run.checkpoint.exists():
        state.load(run.checkpoint, identity)
    elif cfg.resume and dp.main:
        print(f"note: {cfg.out} holds no checkpoint yet; starting from step 0")
    return run


def _check_checkpoint_kind(cfg: TrainConfig) -> None:
    """A sharded checkpoint resumes only with --fsdp (on any number of processes), a plain one only without."""
    out = Path(cfg.out)
    if not cfg.resume:
        return
    if cfg.fsdp and (out / CHECKPOINT_NAME).exists() and not (out / sharding.CHECKPOINT).exists():
        raise LensesError(f"{out} holds a checkpoint of a run without --fsdp; resume it without --fsdp.")
    if not cfg.fsdp and (out / sharding.CHECKPOINT).exists():
        raise LensesError(f"{out} holds a sharded checkpoint (--fsdp); resume it with `torchrun --nproc_per_node N "
                          "train_probes.py ... --fsdp --resume` (any N, 1 included).")


def _check_job(cfg: TrainConfig, preloaded: bool):
    """What is checked before the output folder is claimed or a weight is read: the batch splits over the
    processes, and (for a model loaded here on one device) the memory plan fits."""
    def check(dp: DataParallel) -> None:
        if cfg.fsdp:
            sharding.check_launch(quantize=cfg.quantize)
        if cfg.batch_size % dp.world:
            raise LensesError(f"--batch-size {cfg.batch_size} does not split evenly over {dp.world} processes; "
                              f"use a multiple of {dp.world}.")
        if cfg.plan_check and not preloaded and cfg.device_map is None:
            device = dp.device or cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
            matmul = "float32" if cfg.compute_dtype in ("auto", "float32") else cfg.compute_dtype
            check_fits(cfg.model, PlanOptions(job="train", model_dtype=cfg.model_dtype, compute_dtype=matmul,
                                              batch_size=cfg.batch_size, seq_len=cfg.seq_len, optimizer=cfg.optimizer,
                                              fsdp=cfg.fsdp),
                       world=dp.world, device=device)
    return check


def data_accounting(cfg: TrainConfig, total: int, train_blocks: torch.Tensor, eval_blocks: torch.Tensor,
                    n_docs: int, first: int = 0) -> dict[str, Any]:
    """Training and held-out tokens asked for, available and used, and how often the training text
    repeats; ``lines`` says it in words (printed, and kept in the lens's config)."""
    source = corpora.resolve_name(cfg.corpus)
    train_avail, used = int(train_blocks.numel()), total * cfg.tokens_per_step
    asked_eval = max(1, cfg.max_eval_tokens // cfg.seq_len) * cfg.seq_len
    passes = used / max(1, train_avail)
    lines = [f"data: training on {used:,} tokens ({total:,} steps of {cfg.batch_size} x {cfg.seq_len}) from "
             f"{train_avail:,} training tokens of {source} ({n_docs:,} documents, about {1 - cfg.eval_fraction:.0%} of "
             f"them; the rest is held out)",
             f"data: held-out evaluation on {eval_blocks.numel():,} tokens (asked for up to {cfg.max_eval_tokens:,})"]
    if first:
        lines.append(f"note: each block starts with the tokenizer's {first} special token(s) (BOS), as the model reads "
                     f"text; {'that position is' if first == 1 else 'those positions are'} not scored: "
                     f"{used * (cfg.seq_len - first) // cfg.seq_len:,} training tokens in the loss")
    if passes > 1:
        lines.append(f"note: the training text repeats: {used:,} tokens read from {train_avail:,} is {passes:.1f} "
                     "passes over it; add text (--corpus) or lower --max-tokens / --steps for one pass")
    if eval_blocks.numel() < min(cfg.max_eval_tokens, asked_eval):
        lines.append(f"note: only {eval_blocks.numel():,} held-out tokens, fewer than the {asked_eval:,} asked for; "
                     "add text or raise --eval-fraction")
    return {"source": source, "documents": n_docs, "train_tokens_available": train_avail, "train_tokens_used": used,
            "passes": round(passes, 3), "eval_tokens_requested": cfg.max_eval_tokens,
            "eval_tokens_used": int(eval_blocks.numel()), "lines": lines}


def _check_seq_len(cfg: TrainConfig, adapter: ModelAdapter) -> None:
    config = adapter.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = next((getattr(config, a) for a in ("max_position_embeddings", "n_positions", "n_ctx")
                  if isinstance(getattr(config, a, None), int)), None)
    if limit and cfg.seq_len > limit:
        raise LensesError(f"--seq-len {cfg.seq_len} is longer than the model's {limit} positions; use --seq-len "
                          f"{limit} or less.")


def train_step(run: Run, step: int) -> list[float]:
    """One optimiser step (all processes in step); returns the per-layer mean KL."""
    cfg, adapter, dp, state = run.cfg, run.adapter, run.dp, run.state
    idx = batch_indices(step, cfg.batch_size, len(run.train_blocks), cfg.seed)
    mine = dp.shard(idx)  # all of idx in a single process
    first = convention.of(run.tokenizer).first  # the tokenizer's special prefix (BOS) is never scored
    blocks = run.train_blocks[mine]
    hidden = adapter.hidden_states(blocks)[:, :, first:].flatten(1, 2)
    weights = None
    if not cfg.variant.neutral:  # weights are normalised over the global batch, as in one process
        tokens = position_tokens(cfg.variant.token, adapter, blocks[:, first:], hidden)
        tokens = dp.gather_rows(tokens.view(len(mine), -1).to(hidden.device)).reshape(-1).cpu()
        rng = torch.Generator().manual_seed(cfg.seed * 7919 + step)  # resumable: a function of step
        weights = cfg.variant.weights(tokens, run.freqs, rng)
        weights = dp.shard(weights.view(len(idx), -1)).reshape(-1).to(hidden.device)
    lens = state.lens
    state.optimizer.zero_grad(set_to_none=True)
    layer_kl = lens_kl_backward(lens, hidden, weights, run.dtype, cfg.chunk_rows, translate=state.translate).mean(1)
    params = lens.trainable()
    if state.translator is None:
        dp.mean_(*[p.grad for p in params], layer_kl)
    else:  # FSDP has averaged the gradients (reduce-scatter); each process checks its own shard
        dp.mean_(layer_kl)
    local = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
    if dp.any(not all(torch.isfinite(g).all() for g in local)):
        raise LensesError(
            f"non-finite gradient at step {step} (NaN/inf in hidden states or loss, e.g. fp16 overflow). "
            "Load the model in float32 or bfloat16 (--model-dtype) or lower --lr, then resume (--resume)."
        )
    torch.nn.utils.clip_grad_norm_(params, cfg.clip)
    state.optimizer.step()
    state.scheduler.step()
    run.tokens += hidden.shape[1] * dp.world
    return layer_kl.tolist()


def loop(run: Run, stop_requested=lambda: False) -> None:
    """Train from ``run.state.step`` to the last step, checkpointing; when ``stop_requested()`` turns
    true, checkpoint at the step boundary and raise a `LensesError` that says how to resume."""
    from tqdm.auto import tqdm

    cfg, dp, state = run.cfg, run.dp, run.state
    bar = tqdm(total=run.total, initial=state.step, unit="step", disable=not (cfg.progress and dp.main),
               desc="training")
    t0 = time.perf_counter()
    for step in range(state.step, run.total):
        layer_kl = train_step(run, step)
        state.step = step + 1
        state.log += [[step, layer, v] for layer, v in enumerate(layer_kl)]
        bar.set_postfix(kl=f"{sum(layer_kl) / len(layer_kl):.3f}",
                        tok_s=f"{run.tokens / (time.perf_counter() - t0):.0f}")
        bar.update(1)
        if dp.any(stop_requested()):
            state.save(run.checkpoint, run.identity, main=dp.main)
            bar.close()
            raise LensesError(f"interrupted after step {state.step} of {run.total}; progress saved in "
                              f"{run.checkpoint}. Continue with the same command plus --resume.")
        if state.step % cfg.checkpoint_every == 0:
            state.save(run.checkpoint, run.identity, main=dp.main)
    bar.close()
    run.seconds = time.perf_counter() - t0


def finish(run: Run) -> TrainResult:
    """Evaluate on the held-out blocks (logit lens vs the trained lens) and write every output."""
    cfg, state, out = run.cfg, run.state, Path(run.cfg.out)
    log = pd.DataFrame(state.log, columns=["step", "layer", "kl"])
    state.save(run.checkpoint, run.identity, main=run.dp.main)
    lens = state.lens if state.translator is None else _gathered(run)
    if not run.dp.main and state.translator is None:  # the others hold the same lens; the main one evaluates
        run.dp.barrier()
        return TrainResult(lens, log, pd.DataFrame(), pd.DataFrame(), run.freqs, out)
    lenses = {"logit": LogitLens(run.adapter), lens.kind: lens}  # sharded blocks: every process runs every pass
    held = evaluate(run.adapter, lenses, run.eval_blocks, run.tokenizer, batch_size=cfg.batch_size,
                    chunk_rows=cfg.chunk_rows, dtype=run.dtype)
    if not run.dp.main:
        run.dp.barrier()
        return TrainResult(lens, log, pd.DataFrame(), pd.DataFrame(), run.freqs, out)
    table = held.table()
    buckets = pd.concat([bucket_shares(top1, run.freqs).assign(lens=name) for name, top1 in held.top1.items()])
    buckets = buckets[["lens", "layer", "bucket", "share"]]
    lens.config.update(
        training={
            **{k: plain(v) for k, v in vars(cfg).items() if k not in ("out", "progress", "device", "resume",
                                                                       "overwrite")},
            "train_tokens": run.total * cfg.tokens_per_step,
            "eval_tokens": int(run.eval_blocks.numel()),
            "tokens_per_second": run.tokens / run.seconds if run.tokens and run.seconds else None,
            "compute_dtype_used": run.identity["compute_dtype_used"],
            "data": {k: v for k, v in run.data.items() if k != "lines"},
        },
        variant={"name": cfg.label(), **asdict(cfg.variant)},
        input=convention.of(run.tokenizer).record(run.tokenizer),
        heldout_kl_nats=table[table.lens == lens.kind].kl_nats.round(5).tolist(),
    )
    lens.save_pretrained(out)
    write_csv(out / "training_log.csv", log)
    write_csv(out / "eval.csv", table)
    write_csv(out / "eval_top1_buckets.csv", buckets)
    run.freqs.save(out)
    if run.folder:
        run.folder.finish()
    run.dp.barrier()
    return TrainResult(lens, log, table, buckets, run.freqs, out)


def _gathered(run: Run) -> Lens:
    """The sharded lens, whole, as a plain lens on every process (collective); prints what each process
    held while training."""
    state = run.state
    held = {"lens": sharding.local_bytes(state.lens.trainable()), "optimizer state": sharding.optimizer_bytes(
        state.optimizer)}
    whole = sum(p.numel() * p.element_size() for p in state.lens.trainable())
    h = sharding.human
    print(f"fsdp: process {run.dp.rank} of {run.dp.world} held {h(held['lens'])} of the lens's {h(whole)}, as much "
          f"again of gradients, and {h(held['optimizer state'])} of optimizer state", flush=True)
    lens = type(state.lens).for_model(run.adapter)
    lens.load_state_dict(sharding.full_state(state.lens))
    lens.config = state.lens.config
    return lens


def train(cfg: TrainConfig, model=None, tokenizer=None, lens_class: type[Lens] = TunedLens) -> TrainResult:
    """Train a tuned lens (or any `Lens` class with trainable parameters, ``lens_class``) on the KL
    loss; write it and its tables into ``cfg.out``; return them.

    Outputs: ``config.json`` + ``translators.safetensors`` (the lens), ``training_log.csv``
    (step, layer, kl), ``eval.csv`` (layer, lens, kl_nats, kl_bits_per_byte),
    ``eval_top1_buckets.csv`` (lens, layer, bucket, share), ``token_frequencies.safetensors``
    and ``checkpoint.pt``. (The CLI adds the plot ``eval_kl.png``.)
    """
    check = _check_job(cfg, preloaded=model is not None)
    with open_job(cfg, "train", model, tokenizer, owned=sharding.OWNED, check=check, seed=cfg.seed) as job:
        run = setup(job, cfg, lens_class)
        loop(run, job.stop_requested)
        return finish(run)
