#!/usr/bin/env python
"""The memory plan against the measured peak of real runs on this CPU.

    python benchmarks/plan_check.py                 # tiny, GPT-2-small shapes, Llama-3.2-1B shapes
    python benchmarks/plan_check.py --sizes tiny    # one size

For each size, a fresh process builds a random-weight model from the config (values do not matter
for memory), compiles the vocabulary kernels on a throw-away model, notes its RSS, then runs the real
job (`lenses.jobs.train.train`, one step, and `lenses.tracing.trace.trace`) and reads the process's peak RSS. The
measured figure is the peak minus the RSS before the model was built; the plan's is the sum of its
components for this machine (without the runtime, which the baseline already holds). Writes
benchmarks/plan_check.csv (and the docs' table through scripts/doc_tables.py).
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

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "configs"

# (config file, job options) per size; the batch is what a run at that size would use here
SIZES = {
    "tiny": ("tiny-llama.json", dict(batch_size=8, seq_len=128)),
    "smollm2": (None, dict(batch_size=8, seq_len=256)),  # the default model itself, as `lenses train` runs it
    "gpt2-small": ("gpt2.json", dict(batch_size=4, seq_len=256)),
    "llama-1b": ("llama-3.2-1b.json", dict(batch_size=2, seq_len=256, model_dtype="bfloat16")),
}


# glibc's malloc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which freed memory
# stays resident in the heap: the peak RSS then depends on the order of frees, not on what is alive. The probes
# fix the threshold so that RSS follows the live memory (users can set the same variable).
MMAP_THRESHOLD = 64 * 1024


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak() -> int:
    """The process's peak RSS since the last `reset_peak` (Linux: VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (Linux >= 4.0)
        f.write("5")


def model_folder(size: str) -> Path:
    """A random-weight model of the size's config, saved once like a downloaded model (safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    file, opts = SIZES[size]
    if file is None:
        from lenses.model.loading import resolve_model_path

        return Path(resolve_model_path(None))
    folder = Path(tempfile.gettempdir()) / "lenses-plan-models" / size
    if not (folder / "config.json").exists():
        dtype = getattr(torch, opts.get("model_dtype", "float32"))
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DATA / file), dtype=dtype)
        model.save_pretrained(folder)
    return folder


def probe(size: str, job: str) -> dict:
    """Runs in a fresh process: measure one job at one size, loaded as a user would load it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lenses import ModelAdapter
    from lenses.jobs.plan import PlanOptions, components, model_shapes
    from lenses.jobs.train import TrainConfig, train
    from lenses.kinds.lens import LogitLens, TunedLens
    from lenses.model.loading import load_model, resolve_model_path
    from lenses.tracing.trace import TraceItem, trace

    file, opts = SIZES[size]
    dtype = opts.get("model_dtype", "float32")
    folder = model_folder(size)
    tok = AutoTokenizer.from_pretrained(resolve_model_path(None))  # SmolLM2's: its vocabulary fits every config
    if file is not None:
        tok.save_pretrained(folder)
    text = Path(tempfile.mkdtemp()) / "corpus.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog and keeps running"] * 2000))
    batch = opts["batch_size"] if job == "train" else 1

    def run_job(model, out, batch, seq):
        if job == "train":
            cfg = TrainConfig(corpus=str(text), out=out, seq_len=seq, batch_size=batch, steps=2, progress=False,
                              max_eval_tokens=batch * seq, eval_fraction=0.3, compute_dtype="bfloat16",
                              model=str(folder), model_dtype=dtype)
            train(cfg, model=model, tokenizer=tok)
        else:
            adapter = ModelAdapter.from_model(model)
            ids = torch.randint(0, 40000, (seq,))
            trace(adapter, {"logit": LogitLens(adapter), "tuned": TunedLens.for_model(adapter)},
                  [TraceItem(ids=ids, positions=list(range(seq)))], progress=False)

    # compile the vocabulary kernels (static, then dynamic shapes) on throw-away two-block models
    for n_tokens in (160, 96):  # > 128 positions: the teacher block and the chunk differ in size, as in a real run
        small = AutoConfig.from_pretrained(DATA / file if file else folder)
        for k in ("num_hidden_layers", "n_layer"):
            if hasattr(small, k):
                setattr(small, k, 2)  # two: a size of 1 would be specialised by the compiler
        warm = AutoModelForCausalLM.from_config(small, dtype=getattr(torch, dtype)).eval().requires_grad_(False)
        run_job(warm, tempfile.mkdtemp() + "/warm", 2, n_tokens)
        del warm
    base = rss()
    reset_peak()
    t0 = time.perf_counter()
    model, _ = load_model(folder, dtype=dtype)  # as `lenses train --model FOLDER` loads it
    run_job(model, tempfile.mkdtemp() + "/run", batch, opts["seq_len"])
    measured = peak() - base
    shapes = model_shapes(folder)
    o = PlanOptions(job=job, model_dtype=dtype, batch_size=batch, seq_len=opts["seq_len"],
                    compute_dtype="bfloat16" if job == "train" else "float32",
                    lens="tuned" if job == "train" else "logit,tuned", device_type="cpu")
    comp = components(shapes, o, 1)
    planned = sum(comp.values())
    return {"size": size, "job": job, "model_dtype": dtype, "batch": batch, "seq_len": o.seq_len,
            "params": shapes.params, "planned_mib": planned / 2**20, "measured_mib": measured / 2**20,
            "ratio": measured / planned, "seconds": time.perf_counter() - t0,
            **{f"plan {k} (MiB)": v / 2**20 for k, v in comp.items()}}


def machine() -> str:
    from machine import describe  # benchmarks/machine.py, beside this script

    return describe()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--jobs", default="train,trace")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "plan_check.csv"))
    p.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.probe:
        print("RESULT " + json.dumps(probe(*a.probe)))
        return
    import pandas as pd

    rows = []
    for size in a.sizes.split(","):
        for job in a.jobs.split(","):
            run = subprocess.run([sys.executable, __file__, "--probe", size, job], capture_output=True, text=True,
                                 env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
            line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{size} {job} failed:\n{run.stderr[-3000:]}")
            row = json.loads(line[7:])
            print(f"{size:>10} {job:>5}: planned {row['planned_mib']:8.1f} MiB, measured {row['measured_mib']:8.1f} "
                  f"MiB, measured/planned {row['ratio']:.3f}", flush=True)
            rows.append(row)
    table = pd.DataFrame(rows)
    table["machine"] = machine()
    table["date"] = time.strftime("%Y-%m-%d")
    table.to_csv(a.out, index=False)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
