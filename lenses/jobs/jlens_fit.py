"""Fitting a Jacobian lens: the reference estimator (Gurnee et al. 2026), resumable and data-parallel.

For one prompt of ``T`` tokens the valid positions are ``V = {skip_first, ..., T-2}`` and

    J_p[k] = mean over sources t in V of  sum over targets t' in V of  d hidden[L][t'] / d hidden[k][t]

(causality makes every term with ``t' < t`` zero). The lens is the mean of ``J_p`` over prompts, each
prompt weighted equally. One reverse pass per output dimension gives row ``i`` of ``J_p[k]`` for
every layer ``k`` at once: the cotangent is ``e_i`` at every valid target; ``dim_batch`` dimensions
run side by side on copies of the prompt, all on one retained graph (`prompt_jacobian`).

Three things make it cheaper than the textbook loop without changing a number: the model's weights
never require gradients (the graph starts at the earliest source layer); the first ``skip_first``
positions run once without gradients and serve the rest as a key/value cache, so no backward pass
touches them; and the last position, neither a source nor a target, is not run at all (causal
models: the other positions do not see it). At 128 tokens the backward runs 111 rows per prompt
copy instead of 128. Blocks of the Llama and Gemma families run their backward passes written out
(`lenses.jobs.jlens_written`: the prompt's transposed Jacobian applied directly, no graph replayed), the
rest being matmuls near the machine's limit (benchmarks/jacobian_fit.py); other blocks run autograd.

`fit` is the long job (``lenses fit``): prompts from a corpus, a checkpoint in
the reference's own format after every prompt (``--resume`` continues exactly), a progress bar with
prompts/s and the running relative change, an optional early stop, and data parallelism over
prompts with ``torchrun``/``accelerate launch`` (each process fits every N-th prompt; the sums are
added at the end). With ``--fsdp`` (`fit_loop_sharded`) the model's blocks and the sums are sharded
over the processes as well: no process holds the whole model, a whole ``J_p`` or the whole sum.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lenses.base.errors import DataError, LensesError
from lenses.base.io import atomic_write, write_csv
from lenses.base.options import ParallelOptions, ResumeOptions, option
from lenses.jobs import jlens_written, sharding
from lenses.jobs.jlens_estimator import (
    SKIP_FIRST,
    check_layers,
    corpus_prompts,
    owned_rows,
    prompt_jacobian,
    row_blocks,
)
from lenses.jobs.jlens_state import FitState
from lenses.jobs.runs import Job, job_corpus, open_job
from lenses.kinds.jacobian import JacobianLens
from lenses.kinds.lens import LogitLens
from lenses.model.adapter import ModelAdapter
from lenses.model.loading import DEFAULT_MODEL, ModelOptions
from lenses.text import convention, corpora
from lenses.text.corpora import CorpusOptions
from lenses.text.data import make_blocks
from lenses.tracing.evaluate import evaluate

CHECKPOINT_NAME = "jacobian_checkpoint.pt"
SHARDS, SHARD_FILE = "jacobian_checkpoint.shards", "jacobian_shard.rank{rank}.pt"  # a sharded fit's checkpoint
PUBLISHED_NAME = "jacobian_lens.pt"


# --------------------------------------------------------------------------- the long job


def _check_layer_spec(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        return f"{text!r} is not a comma-separated list of layer numbers (e.g. 1,2,3)."
    return None


@dataclass
class FitConfig(ModelOptions, ParallelOptions, ResumeOptions, CorpusOptions):
    """A Jacobian-lens fit (``lenses fit``)."""

    OUT = "runs/jlens"

    num_prompts: int = option(100, "prompts to fit (the reference: ~100 usable, 1,000 published)", group="recipe",
                              min=1)
    seq_len: int = option(128, "tokens per prompt (BOS included)", group="recipe", min=3)
    min_chars: int = option(600, "documents shorter than this many characters are not used as prompts",
                            group="recipe", min=0)
    skip_first: int = option(SKIP_FIRST, "leading positions excluded as sources and targets", group="recipe", min=0)
    source_layers: str | None = option(None, "our hidden-state numbers to fit, e.g. 1,2,3 (none: 1..L-1)",
                                       group="recipe", check=_check_layer_spec)
    backward_dtype: str = option("float32", "dtype of the backward passes' matmuls: bfloat16 is about 1.8x faster "
                                 "on a CPU with AVX512-BF16 or AMX (weights rounded stochastically, sums in float32; "
                                 "its J stays within a tenth of J's sampling error over prompts: docs/jacobian.md)",
                                 group="recipe", choices=("float32", "bfloat16"))
    dim_batch: int = option(8, "output dimensions per backward pass (memory vs. speed; no effect on J)",
                            group="runtime", min=1)
    tol: float = option(0.0, "stop early once the running mean's relative change per prompt falls below this "
                             "(0: fit every prompt)", group="runtime", min=0)
    min_prompts: int = option(16, "never stop early before this many prompts", group="runtime", min=1)
    eval_tokens: int = option(4096, "held-out tokens for the lens's KL table (0: none)", group="runtime", min=0)

    def __post_init__(self):
        super().__post_init__()
        if self.fsdp and self.backward_dtype != "float32":  # sharded weights have no whole half copy to make
            raise LensesError("--backward-dtype bfloat16 needs the whole model on each process; drop --fsdp (plain "
                              "data parallel keeps it) or use --backward-dtype float32.")

    def recipe(self) -> dict[str, Any]:
        import dataclasses

        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("fixed")}


@dataclass
class FitResult:
    lens: JacobianLens
    convergence: pd.DataFrame  # prompt, n_done, seconds, rel_change, dist_identity
    eval: pd.DataFrame  # layer, lens, kl_nats, kl_bits_per_byte
    out: Path


def _digest(prompts: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.numpy().astype("int64").tobytes() + b"|")
    return h.hexdigest()[:16]


@dataclass
class FitRun:
    """Everything the fit's loop and finish need, made by `fit_setup`."""

    cfg: FitConfig
    job: Job
    layers: list[int]
    texts: list[str]
    mine: list[torch.Tensor]  # this process's share of the prompts
    identity: dict
    state: FitState
    checkpoint: Path
    before: float = 0.0  # seconds spent by earlier sessions of this fit
    seconds: float = 0.0  # this session's
    stand_in: torch.Tensor | None = None  # sharded: run when this process's share is done (weight 0)


def fit(cfg: FitConfig, model=None, tokenizer=None) -> FitResult:
    """Fit a Jacobian lens on ``cfg.corpus``; write it (our folder + the published file), its convergence
    log and its held-out KL into ``cfg.out``; return them. The job is `lenses.jobs.runs.open_job`, then
    `fit_setup`, `fit_loop` and `fit_finish`."""
    check = (lambda dp: sharding.check_launch(quantize=cfg.quantize)) if cfg.fsdp else None
    owned = ("jacobian_checkpoint.rank*.pt", SHARD_FILE.format(rank="*"))
    with open_job(cfg, "jacobian", model, tokenizer, owned=owned, check=check) as job:
        job.dp.barrier()  # the folder is claimed before any process writes its checkpoint there
        run = fit_setup(job, cfg)
        (fit_loop_sharded if cfg.fsdp else fit_loop)(run)
        return fit_finish(run)


def fit_setup(job: Job, cfg: FitConfig) -> FitRun:
    """The prompts (this process's share), the identity of the fit, and its state (resumed if asked)."""
    dp, adapter = job.dp, job.adapter
    layers = check_layers(adapter, None if cfg.source_layers is None else
                          [int(p) for p in cfg.source_layers.split(",") if p.strip()])
    texts = job_corpus(job, cfg.corpus, progress=cfg.progress)
    prompts = corpus_prompts(texts, job.tokenizer, cfg.num_prompts, cfg.seq_len, cfg.min_chars)
    prompts = [p for p in prompts if len(p) > cfg.skip_first + 1]
    if not prompts:
        raise DataError(f"the corpus gives no document of {cfg.min_chars}+ characters and more than "
                        f"{cfg.skip_first + 1} tokens; lower --min-chars or --skip-first, or add text.")
    if dp.main:
        print(f"data: fitting on {len(prompts):,} prompts (asked for {cfg.num_prompts:,}) of up to {cfg.seq_len} "
              f"tokens from the training side of {corpora.resolve_name(cfg.corpus)} ({len(texts):,} documents)")
        print(f"backward passes: {jlens_written.describe(adapter, cfg.fsdp)}, matmuls in {cfg.backward_dtype}")
        if len(prompts) < cfg.num_prompts:
            print(f"note: the corpus gives {len(prompts)} prompts, fewer than --num-prompts {cfg.num_prompts}")
    identity = {"recipe": cfg.recipe(), "prompts": _digest(prompts), "world": dp.world,
                "layers": layers, "fingerprint": adapter.fingerprint()}
    acc = torch.promote_types(next(adapter.model.parameters()).dtype, torch.float32)
    rows = None
    if cfg.fsdp:
        sharding.shard_blocks(adapter, dp.device)  # under torchrun with one process, this starts the group
        rows = owned_rows(adapter.d_model, cfg.dim_batch, dp.world, dp.rank)
        identity.update(fsdp=True, dim_batch=cfg.dim_batch)
        ckpt = Path(cfg.out) / SHARDS / SHARD_FILE.format(rank=dp.rank)
    else:
        ckpt = Path(cfg.out) / (CHECKPOINT_NAME if dp.world == 1 else f"jacobian_checkpoint.rank{dp.rank}.pt")
    _check_checkpoint_kind(cfg)
    n_rows = adapter.d_model if rows is None else len(rows)
    state = FitState(layers, torch.zeros(len(layers), n_rows, adapter.d_model, dtype=acc), rows=rows)
    if cfg.resume and ckpt.exists():
        state.load(ckpt, identity)
    before = state.log[-1][2] if state.log else 0.0
    return FitRun(cfg, job, layers, texts, prompts[dp.rank :: dp.world], identity, state, ckpt, before,
                  stand_in=prompts[0])


def _check_checkpoint_kind(cfg: FitConfig) -> None:
    """A sharded fit resumes only with --fsdp, a plain one only without."""
    out = Path(cfg.out)
    if not cfg.resume:
        return
    plain = (out / CHECKPOINT_NAME).exists() or any(out.glob("jacobian_checkpoint.rank*.pt"))
    if cfg.fsdp and plain and not (out / SHARDS).exists():
        raise LensesError(f"{out} holds a fit made without --fsdp; resume it without --fsdp.")
    if not cfg.fsdp and (out / SHARDS).exists():
        raise LensesError(f"{out} holds a sharded fit (--fsdp); resume it with `torchrun --nproc_per_node N "
                          "lenses fit ... --fsdp --resume` (the same N).")


def fit_loop(run: FitRun) -> None:
    """Fit prompt after prompt, checkpointing after each; stop early once converged (``--tol``), or at a
    prompt boundary when asked to (Ctrl-C, SIGTERM), saying how to resume."""
    from tqdm.auto import tqdm

    cfg, dp, adapter, state, mine = run.cfg, run.job.dp, run.job.adapter, run.state, run.mine
    bar = tqdm(total=len(mine), initial=state.next_idx, unit="prompt", desc="fitting J-lens",
               disable=not (cfg.progress and dp.main))
    t0, done_here, rel = time.perf_counter(), 0, math.inf
    # every process runs the same number of rounds (its collectives pair up with the others'), fitting
    # its next prompt while it has one; after a resume the processes may be a prompt apart
    while dp.any(state.next_idx < len(mine)):
        if state.next_idx < len(mine):
            J = prompt_jacobian(adapter, mine[state.next_idx], run.layers, cfg.skip_first, cfg.dim_batch,
                                backward_dtype=getattr(torch, cfg.backward_dtype))
            rel, dist = state.add(J)
            state.next_idx += 1
            done_here += 1
            elapsed = time.perf_counter() - t0
            state.log.append([dp.rank + dp.world * (state.next_idx - 1), state.n_done, run.before + elapsed,
                              rel, dist])
            state.save(run.checkpoint, run.identity, adapter.num_layers - 1, cfg.skip_first)
            bar.set_postfix(prompt_s=f"{done_here / elapsed:.3g}", change=f"{rel:.2e}", dist_I=f"{dist:.3f}")
            bar.update(1)
        if _should_stop(run, state, rel, not dp.any(not (cfg.tol > 0 and state.n_done >= cfg.min_prompts
                                                             and rel < cfg.tol)), run.checkpoint, bar):
            break
    bar.close()
    run.seconds = time.perf_counter() - t0


def _should_stop(run: FitRun, state: FitState, rel: float, converged: bool, saved, bar) -> bool:
    """True once every process has converged (said by the main one); an interrupt raises, naming ``saved``."""
    if converged:
        if run.job.dp.main:
            print(f"converged: the running mean changed by {rel:.2e} < --tol {run.cfg.tol} after "
                  f"{state.n_done} prompts")
        return True
    if run.job.dp.any(run.job.stop_requested()):
        bar.close()
        raise LensesError(f"interrupted after {state.n_done} prompts; progress saved in {saved}. "
                          "Continue with the same command plus --resume.")
    return False


def fit_loop_sharded(run: FitRun) -> None:
    """`fit_loop` with the model's blocks and the sums sharded (``--fsdp``): in each round every process
    fits its next prompt (a process whose share is done runs a stand-in with weight 0, so that the
    processes' collectives pair up), and each block of ``dim_batch`` rows is added over the processes
    straight into the process that holds it: no process ever holds a whole ``J_p`` or the whole sum."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    cfg, dp, adapter, state, mine = run.cfg, run.job.dp, run.job.adapter, run.state, run.mine
    world, rank, main = dp.world, dp.rank, dp.main
    local = {int(r): i for i, r in enumerate(state.rows)}  # output dimension -> row of this shard

    def allsum(t: torch.Tensor) -> torch.Tensor:
        t = t.to(adapter.device)
        dist.all_reduce(t)
        return t.cpu()

    bar = tqdm(total=len(mine), initial=state.next_idx, unit="round", desc="fitting J-lens",  # rank 0: the most
               disable=not (cfg.progress and main))
    t0, done_here, rel = time.perf_counter(), 0, math.inf
    while dp.any(state.next_idx < len(mine)):
        real = state.next_idx < len(mine)
        ids = mine[state.next_idx] if real else run.stand_in
        delta = torch.zeros_like(state.sums)
        for start, rows in row_blocks(adapter, ids, run.layers, cfg.skip_first, cfg.dim_batch, written_ok=False):
            rows = (rows if real else torch.zeros_like(rows)).contiguous()
            owner = (start // cfg.dim_batch) % world
            dist.reduce(rows, dst=owner)
            if rank == owner:
                at = local[start]
                delta[:, at : at + rows.shape[1]] = rows.cpu()
        count = int(allsum(torch.tensor([float(real)])).item())
        rel, dist_id = state.add(delta, count, allsum)
        del delta
        state.next_idx += 1
        done_here += count
        elapsed = time.perf_counter() - t0
        state.log.append([state.n_done - 1, state.n_done, run.before + elapsed, rel, dist_id])
        sharding.save_rank_files(run.checkpoint.parent, SHARD_FILE,
                                 lambda path: atomic_write(path, lambda tmp: torch.save(
                                     state.payload(run.identity, adapter.num_layers - 1, cfg.skip_first), tmp)),
                                 main)
        bar.set_postfix(prompt_s=f"{done_here / elapsed:.3g}", change=f"{rel:.2e}", dist_I=f"{dist_id:.3f}")
        bar.update(1)
        # rel is the same number in every process (the norms are added over them)
        if _should_stop(run, state, rel, cfg.tol > 0 and state.n_done >= cfg.min_prompts and rel < cfg.tol,
                        run.checkpoint.parent, bar):
            break
    bar.close()
    run.seconds = time.perf_counter() - t0


def _whole_sums(state: FitState, adapter: ModelAdapter, world: int, rank: int) -> torch.Tensor:
    """Every process's rows put together, on every process (collective; one layer at a time on the device),
    after saying how much of the sums each process held."""
    import torch.distributed as dist

    d = adapter.d_model
    held, whole = state.sums.numel() * state.sums.element_size(), len(state.layers) * d * d * state.sums.element_size()
    print(f"fsdp: process {rank} of {world} held {sharding.human(held)} of the sums' {sharding.human(whole)}",
          flush=True)
    out = torch.zeros(len(state.layers), d, d, dtype=state.sums.dtype)
    for j in range(len(state.layers)):
        layer = torch.zeros(d, d, dtype=state.sums.dtype, device=adapter.device)
        layer[state.rows.to(adapter.device)] = state.sums[j].to(adapter.device)
        dist.all_reduce(layer)
        out[j] = layer.cpu()
    return out


def fit_finish(run: FitRun) -> FitResult:
    """The mean over every process's prompts; the main process evaluates it and writes every file."""
    cfg, dp, adapter, state = run.cfg, run.job.dp, run.job.adapter, run.state
    n = torch.tensor([float(state.n_done)], dtype=torch.float64)  # sharded: already the count of every process
    if cfg.fsdp:
        sums = _whole_sums(state, adapter, dp.world, dp.rank)
    else:
        sums = state.sums.clone()
        dp.sum_(sums, n)
    lens = JacobianLens.from_matrices(
        {k: sums[j] / n.item() for j, k in enumerate(run.layers)}, adapter.num_layers,
        {"model": cfg.model or DEFAULT_MODEL, "n_prompts": int(n.item()), "corpus": corpora.resolve_name(cfg.corpus),
         "skip_first": cfg.skip_first, "seq_len": cfg.seq_len, "fit_seconds": run.before + run.seconds,
         "backward_dtype": cfg.backward_dtype,
         "final_rel_change": state.log[-1][3] if state.log else None,
         "input": convention.of(run.job.tokenizer).record(run.job.tokenizer)},
        model=adapter)
    convergence = pd.DataFrame(state.log, columns=["prompt", "n_done", "seconds", "rel_change", "dist_identity"])
    table = pd.DataFrame()
    if cfg.eval_tokens and (dp.main or cfg.fsdp):  # sharded blocks: every process runs every forward pass
        _, held = make_blocks(run.texts, run.job.tokenizer, 256, max_eval_blocks=max(1, cfg.eval_tokens // 256))
        if dp.main:
            print(f"data: held-out evaluation on {held.numel():,} tokens (asked for up to {cfg.eval_tokens:,})")
        table = evaluate(adapter, {"logit": LogitLens(adapter), "jacobian": lens}, held, run.job.tokenizer).table()
    if dp.main:
        out = Path(cfg.out)
        if cfg.eval_tokens:
            lens.config["heldout_kl_nats"] = [None if math.isnan(v) else round(v, 5)
                                              for v in table[table.lens == "jacobian"].kl_nats]
            write_csv(out / "eval.csv", table)
        lens.save_pretrained(out)
        if not lens.present[0]:
            lens.save_published(out / PUBLISHED_NAME)
        write_csv(out / "convergence.csv", convergence)
        run.job.folder.finish()
    dp.barrier()
    return FitResult(lens, convergence, table, Path(cfg.out))
