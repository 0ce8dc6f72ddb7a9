#!/usr/bin/env python
"""The performance benchmark: one command, one process per measurement family, side by side.

    python benchmarks/run.py                      # SmolLM2 + a random GPT-2-small-sized model
    python benchmarks/run.py --models smollm2 --tokens 512 --train-steps 1   # quicker
    python benchmarks/run.py --models llama-1b --skip memory,load --eval-blocks 2 \
        --out benchmarks/results-llama-1b.csv                                 # Llama-3.2-1B's shapes, bfloat16

Measures, on the same machine, model, tokens, batch and thread count:
  (a) training tokens/s (model forward + lens step) of ours (dtype picked by `auto`, and float32)
      and of the tuned-lens 0.2 package's own step (its lens and unembedding modules, its loss,
      per-layer backward and `.item()`, with its bfloat16 autocast default and in float32), all with
      the same SGD recipe on the same batches, and the held-out KL each lens reaches;
  (b) tracing tokens/s (both lenses, every position, `lenses.tracing.trace.trace`) vs the plain forward;
  (c) the machine's float32 and bfloat16 matmul FLOP/s (median of single GEMMs of the lens's two
      shapes, sampled before and after the work), to express (a) and (b) as a share of the compute limit:
      `share_of_limit` counts the lens matmuls only; `share_of_limit_all_work` also counts the
      model forward and the teacher decode at the float32 limit (ideal time / measured time).
      The "ceiling" row is the training speed with every matmul at its limit;
  (d) peak memory (RSS above the loaded model) of one training step and one trace (logit lens,
      every position) as the sequence grows from 512 to 4096 tokens (a fresh process per point);
  (e) cold (GGUF dequantisation into an empty cache) and warm load time of the default model;
  (f) a profile of one training step and one trace: time in matmuls, in the compiled
      element-wise kernels, in the model forward and in everything else.
Prints a table and writes it as CSV (--out). Machines are noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from machine import describe

from lenses import LogitLens, ModelAdapter, TunedLens, load_model
from lenses.engine import compute_dtype
from lenses.jobs.train import TrainConfig, lens_kl_backward
from lenses.text.data import make_blocks, read_texts
from lenses.tracing.evaluate import evaluate
from lenses.tracing.trace import TraceItem, trace

ROOT = Path(__file__).resolve().parent.parent

SEQ = 256
NATIVE_BF16 = True  # set in main (see bf16_is_native)
EVAL_BLOCKS = 8  # held-out blocks of SEQ tokens for each trained lens's KL (--eval-blocks)


# ---------------------------------------------------------------------------- models and tokens


def get_model(name: str):
    """(model, token blocks for training [n, SEQ], held-out blocks)."""
    if name == "smollm2":
        model, tok = load_model()
        train, held = make_blocks(read_texts(None), tok, SEQ)
        return model, train, held
    if name == "gpt2-small":  # GPT-2 small's shapes (12 x 768, vocab 50,257), random weights
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config()).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        blocks = torch.randint(0, model.config.vocab_size, (64, SEQ), generator=g)
        return model, blocks[:48], blocks[48:56]
    if name == "llama-1b":  # Llama-3.2-1B's shapes (16 x 2048, vocab 128,256), random weights, bfloat16
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(ROOT / "tests" / "data" / "configs" / "llama-3.2-1b.json")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        blocks = torch.randint(0, config.vocab_size, (64, SEQ), generator=g)
        return model, blocks[:48], blocks[48:56]
    raise SystemExit(f"unknown model {name!r}: smollm2, gpt2-small or llama-1b")


def sync() -> None:
    """Wait for the GPU's queued work (a no-op on CPU), so that the clock reads finished work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_samples(dtype: torch.dtype, d: int, V: int, repeats: int = 5, device: str = "cpu") -> list[float]:
    """FLOP/s of single GEMMs of the lens's two vocabulary shapes (logits ``[R, d] @ [d, V]`` and
    gradient ``[R, V] @ [V, d]``, R = 256 and 1024), ``repeats`` of each."""
    out = []
    w = torch.randn(V, d, device=device).to(dtype)
    for rows in (256, 1024):
        a, g = torch.randn(rows, d, device=device).to(dtype), torch.randn(rows, V, device=device).to(dtype)
        for f in (lambda: a @ w.T, lambda: g @ w):
            f()
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                f()
                sync()
                out.append(2 * rows * d * V / (time.perf_counter() - t0))
    return out


def bf16_is_native(device: str = "cpu") -> bool:
    """False where bfloat16 matmuls are emulated (e.g. AVX2-only CPUs: many times slower than float32);
    their rows are then skipped instead of running for an hour."""
    if device != "cpu":
        return True
    a, b = torch.randn(256, 576), torch.randn(576, 2048)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        for _ in range(3):  # the first calls build the kernels
            x @ y
        samples = []
        for _ in range(5):  # the best of five: one slow sample on a busy machine must not decide
            t0 = time.perf_counter()
            x @ y
            samples.append(time.perf_counter() - t0)
        times[dtype] = min(samples)
    return times[torch.bfloat16] < 3 * times[torch.float32]


def forward_flops(adapter, seq: int) -> float:
    """Matmul FLOPs per token of the headless forward: 2 x block parameters + causal attention."""
    params = sum(p.numel() for p in adapter.layers.parameters())
    return 2 * params + 2 * adapter.num_layers * seq * adapter.d_model


# ---------------------------------------------------------------------------- training steps


def ours_step(lens: TunedLens, ids: torch.Tensor, dtype: torch.dtype) -> None:
    hidden = lens.adapter.hidden_states(ids).flatten(1, 2)
    lens_kl_backward(lens, hidden, None, dtype)


def package_step(pkg_lens, model, ids: torch.Tensor, autocast: bool) -> None:
    """tuned-lens 0.2's train-loop body (scripts/train_loop.py), KL loss, one device."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    labels = out.logits.float().log_softmax(dim=-1)
    for i, h in enumerate(out.hidden_states[:-1]):
        with torch.autocast("cpu" if ids.device.type == "cpu" else "cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = pkg_lens(h, idx=i)
            loss = torch.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
            loss.detach().item()  # it logs every layer's loss
        loss.backward()


def package_to_ours(pkg_lens, adapter) -> TunedLens:
    lens = TunedLens.for_model(adapter)
    with torch.no_grad():
        for i, t in enumerate(pkg_lens.layer_translators):
            lens.weight[i].copy_(t.weight.float())
            lens.bias[i].copy_(t.bias.float())
    return lens


def bench_training(model, adapter, train_blocks, held_out, tokens: int, steps: int) -> list[dict]:
    batch = max(1, tokens // SEQ)
    cfg = TrainConfig(steps=steps, batch_size=batch, seq_len=SEQ)  # the tuned-lens SGD recipe
    batches = [train_blocks[(s * batch) % len(train_blocks):][:batch] for s in range(steps + 1)]
    auto = compute_dtype("auto", adapter.device)
    methods = {
        f"ours ({str(auto)[6:]})": ("ours", auto),
        "ours (float32)": ("ours", torch.float32),
        "tuned-lens 0.2 (bf16 autocast, its default)": ("package", True),
        "tuned-lens 0.2 (float32)": ("package", False),
    }
    if not NATIVE_BF16:
        print("bfloat16 is emulated on this CPU: skipping tuned-lens's bf16 autocast row")
        methods.pop("tuned-lens 0.2 (bf16 autocast, its default)")
    if auto == torch.float32:
        methods.pop("ours (float32)")  # the same as the auto row
    try:
        import tuned_lens.model_surgery
        from tuned_lens import TunedLens as PackageLens

        tuned_lens.model_surgery._transformer_lens_available = False  # it probes TransformerLens 3's HookedTransformer
    except ImportError:
        print("tuned-lens is not installed (pip install --no-deps tuned-lens==0.2.0): skipping its rows")
        methods = {k: v for k, v in methods.items() if v[0] == "ours"}
    rows = []
    for name, (kind, arg) in methods.items():
        if kind == "ours":
            lens = TunedLens.for_model(adapter)
            params, step = [lens.weight, lens.bias], (lambda ids, lens=lens: ours_step(lens, ids, arg))
        else:
            pkg = PackageLens.from_model(model)
            params = list(pkg.layer_translators.parameters())  # not its copy of the frozen unembedding
            step = lambda ids, pkg=pkg: package_step(pkg, model, ids, arg)  # noqa: E731
        step(batches[-1][:1])  # warm-up (and torch.compile) on one sequence, then reset
        for p in params:
            p.grad = None
            with torch.no_grad():
                p.zero_()
        opt, sched = _sgd(cfg, params, steps)
        sync()
        t0 = time.perf_counter()
        for s in range(steps):
            step(batches[s])
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        sync()
        seconds = time.perf_counter() - t0
        final = lens if kind == "ours" else package_to_ours(pkg, adapter)
        kl = evaluate(adapter, {"t": final}, held_out[:EVAL_BLOCKS]).kl["t"].mean().item()  # 2,048 tokens by default
        dtype = arg if kind == "ours" else (torch.bfloat16 if arg else torch.float32)
        rows.append({"measure": "train", "method": name, "tokens_per_s": steps * batch * SEQ / seconds,
                     "dtype": str(dtype)[6:], "heldout_kl": kl})
    return rows


def _sgd(cfg: TrainConfig, params, total: int):
    """The tuned-lens recipe (our default too): Nesterov SGD, linear decay."""
    opt = torch.optim.SGD(params, lr=cfg.effective_lr(), momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))


# ---------------------------------------------------------------------------- tracing


def bench_tracing(model, adapter, blocks: torch.Tensor, tokens: int) -> list[dict]:
    """Tracing tokens/s against the plain forward: float32 decoding, and (where this CPU multiplies bfloat16
    natively) the views' default, bfloat16 decoding re-scored in float32 (`engine.rescored_stats`)."""
    batch = blocks[: max(1, tokens // SEQ)]
    lenses = {"logit": LogitLens(adapter), "tuned": TunedLens.for_model(adapter)}
    items = [TraceItem(row.tolist(), list(range(SEQ))) for row in batch]
    n = batch.numel()
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=batch)
    sync()
    forward = n / (time.perf_counter() - t0)
    weights = str(next(model.parameters()).dtype).removeprefix("torch.")
    rows = [{"measure": "forward", "method": "model forward with logits", "tokens_per_s": forward, "dtype": weights}]
    for dtype in ("float32", "bfloat16") if NATIVE_BF16 else ("float32",):
        trace(adapter, lenses, items[:1], dtype=getattr(torch, dtype))  # warm-up (kernels compiled)
        sync()
        t0 = time.perf_counter()
        table = trace(adapter, lenses, items, dtype=getattr(torch, dtype))
        sync()
        how = "float32 decode" if dtype == "float32" else "bfloat16 decode re-scored (the views' default here)"
        rows.append({"measure": "trace", "method": f"trace, logit + tuned lens, all positions, {how}",
                     "tokens_per_s": n / (time.perf_counter() - t0), "dtype": dtype,
                     "rows_decoded_whole": table.attrs.get("rows_decoded_whole", 0)})
    return rows


# ---------------------------------------------------------------------------- profile


def _buckets(fn) -> dict[str, float]:
    """Seconds of ``fn`` in matmuls, in the compiled element-wise kernels, and in everything else."""
    with torch.profiler.profile() as prof:
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
    out = {"matmuls": 0.0, "fused element-wise kernel": 0.0}
    for e in prof.key_averages():
        if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
            out["matmuls"] += e.self_cpu_time_total / 1e6
        elif "CompiledFxGraph" in e.key:
            out["fused element-wise kernel"] += e.self_cpu_time_total / 1e6
    out["everything else"] = max(0.0, total - sum(out.values()))
    return out


def bench_profile(model, adapter, train_blocks, held_out) -> list[dict]:
    """Where a training step and a trace spend their time (one batch of 4 x 256 tokens each)."""
    ids = train_blocks[:4]
    n = ids.numel()
    lens = TunedLens.for_model(adapter)
    dtype = compute_dtype("auto", adapter.device)
    ours_step(lens, ids[:1], dtype)  # warm-up
    forward = _buckets(lambda: adapter.hidden_states(ids))
    hidden = adapter.hidden_states(ids).flatten(1, 2)
    step = _buckets(lambda: lens_kl_backward(lens, hidden, None, dtype))
    lenses = {"logit": LogitLens(adapter), "tuned": TunedLens.for_model(adapter)}
    items = [TraceItem(row.tolist(), list(range(SEQ))) for row in held_out[:4]]
    traced = _buckets(lambda: trace(adapter, lenses, items))
    traced = {k: v - forward.get(k, 0.0) for k, v in traced.items()}  # the trace runs the same forward
    rows = []
    for phase, parts in (("train step", {"model forward": sum(forward.values()), **step}),
                         ("trace", {"model forward": sum(forward.values()), **traced})):
        total = sum(parts.values())
        for part, sec in parts.items():
            rows.append({"measure": "profile", "method": f"{phase}: {part}", "ms_per_token": sec / n * 1e3,
                         "share_of_time": sec / total})
    return rows


# ---------------------------------------------------------------------------- memory (own process)


def rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_probe(name: str, what: str, seq: int) -> None:
    """Run in a fresh process: print peak RSS above the loaded model for one step of ``seq`` tokens."""
    model, train_blocks, _ = get_model(name)
    adapter = ModelAdapter.from_model(model)
    ids = train_blocks.reshape(-1)[:seq][None]
    lens = TunedLens.for_model(adapter)
    ours_step(lens, ids[:, :8], torch.float32)  # warm-up: compile, caches
    trace(adapter, {"logit": LogitLens(adapter)}, [TraceItem(ids[0, :8].tolist(), [0])])
    base = rss_mib()
    if what == "train":
        ours_step(lens, ids, compute_dtype("auto"))
    else:
        trace(adapter, {"logit": LogitLens(adapter)}, [TraceItem(ids[0].tolist(), list(range(seq)))])
    print(json.dumps({"peak_above_model_mib": rss_mib() - base, "model_mib": base}))


def bench_memory(name: str, seqs: list[int]) -> list[dict]:
    rows = []
    for what in ("train", "trace"):
        for seq in seqs:
            out = subprocess.run([sys.executable, __file__, "--memory-probe", name, what, str(seq)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"measure": f"memory ({what})", "method": f"{seq} tokens",
                         "peak_mib": r["peak_above_model_mib"],
                         "model_mib": r["model_mib"]})
    return rows


# ---------------------------------------------------------------------------- load time


def bench_load() -> list[dict]:
    code = ("import time; t=time.perf_counter(); from lenses import load_model; load_model(); "
            "print(time.perf_counter()-t)")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "LENSES_CACHE": cache}
        times = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                      check=True, cwd=ROOT).stdout.split()[-1]) for _ in range(2)]
    return [{"measure": "load", "method": "default model, cold (GGUF -> cache)", "seconds": times[0]},
            {"measure": "load", "method": "default model, warm (fresh process)", "seconds": times[1]}]


# ---------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,gpt2-small")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per training step / traced")
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--seq-lens", default="512,1024,2048,4096", help="memory sweep (default model only)")
    p.add_argument("--skip", default="", help="comma list of: train,trace,profile,memory,load")
    p.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks of 256 tokens for each lens's KL")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results.csv"))
    p.add_argument("--memory-probe", nargs=3, metavar=("MODEL", "WHAT", "SEQ"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_probe:
        return memory_probe(a.memory_probe[0], a.memory_probe[1], int(a.memory_probe[2]))
    skip = set(filter(None, a.skip.split(",")))
    global NATIVE_BF16, EVAL_BLOCKS
    NATIVE_BF16 = bf16_is_native()
    EVAL_BLOCKS = a.eval_blocks
    if not NATIVE_BF16:
        print("note: bfloat16 matmuls are emulated on this CPU (no AVX512-BF16/AMX); bf16 rows are skipped")
    cpu = describe()
    print(f"machine: {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    meta = {"machine": cpu, "bfloat16 matmuls": "native" if NATIVE_BF16 else "emulated",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/run.py " + " ".join(sys.argv[1:])}
    rows = []
    for name in a.models.split(","):
        model, train_blocks, held_out = get_model(name)
        adapter = ModelAdapter.from_model(model)
        L, d, V = adapter.num_layers, adapter.d_model, adapter.vocab_size
        dtypes = ("float32", "bfloat16") if NATIVE_BF16 else ("float32",)
        samples = {k: matmul_samples(getattr(torch, k), d, V) for k in dtypes}
        found = []
        lens_flops = 4 * L * d * V  # per token: logits and gradient matmuls for L layers
        other_flops = 2 * d * V + forward_flops(adapter, SEQ)  # teacher decode + model forward, float32
        if "train" not in skip:
            found += bench_training(model, adapter, train_blocks, held_out, a.tokens, a.train_steps)
        if "trace" not in skip:
            found += bench_tracing(model, adapter, held_out, a.tokens)
        if "profile" not in skip:
            found += bench_profile(model, adapter, train_blocks, held_out)
        # the limit: median single-GEMM speed, sampled before and after the work (this machine is shared
        # and noisy; the median is robust to both slow outliers and short turbo bursts)
        limits = {k: float(np.median(v + matmul_samples(getattr(torch, k), d, V))) for k, v in samples.items()}
        found = [{"measure": "matmul", "method": f"median of [R x {d}] @ [{d} x {V}] and [R x {V}] @ [{V} x {d}]",
                  "dtype": k, "gflop_s": v / 1e9} for k, v in limits.items()] + found
        for r in found:
            if r["measure"] == "train":
                # lens matmuls only (conservative), and all the step's matmul work at each dtype's limit
                r["share_of_limit"] = r["tokens_per_s"] * lens_flops / limits[r["dtype"]]
                ideal = lens_flops / limits[r["dtype"]] + other_flops / limits["float32"]
                r["share_of_limit_all_work"] = r["tokens_per_s"] * ideal
            if r["measure"] == "trace":  # the decode at its dtype's limit, the model forward at its weights'
                trace_flops = 2 * 2 * (L + 1) * d * V  # two lenses, layers 0..L
                r["share_of_limit"] = r["tokens_per_s"] * trace_flops / limits[r["dtype"]]
                weights = str(next(model.parameters()).dtype).removeprefix("torch.")
                ideal = trace_flops / limits[r["dtype"]] + forward_flops(adapter, SEQ) / limits.get(weights, limits[
                    "float32"])
                r["share_of_limit_all_work"] = r["tokens_per_s"] * ideal
        fast = "bfloat16" if NATIVE_BF16 else "float32"
        ceiling = 1 / (lens_flops / limits[fast] + other_flops / limits["float32"])
        found.append({"measure": "train", "method": f"ceiling: every matmul at its limit ({fast} lens, fp32 model)",
                      "dtype": fast, "tokens_per_s": ceiling, "share_of_limit_all_work": 1.0})
        if "memory" not in skip and name == "smollm2":
            found += bench_memory(name, [int(s) for s in a.seq_lens.split(",")])
        rows += [{"model": name, **r} for r in found]
        del model
    if "load" not in skip:
        rows += [{"model": "smollm2", **r} for r in bench_load()]
    table = pd.DataFrame(rows)
    train = table[table.measure == "train"]
    for name, g in train.groupby("model"):  # the ceiling row too: how far 3x tuned-lens is from physics
        best = g[g.method.str.startswith("tuned-lens")].tokens_per_s.max()
        table.loc[g.index, "x_vs_best_tuned_lens"] = g.tokens_per_s / best
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(a.out, index=False)
    Path(a.out).with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {a.out}")
    if Path(a.out).resolve().parent == ROOT / "benchmarks":  # the docs' tables follow the measurement
        subprocess.run([sys.executable, str(ROOT / "scripts" / "doc_tables.py")], check=True)


if __name__ == "__main__":
    main()
