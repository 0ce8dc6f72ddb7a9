#!/usr/bin/env python
"""Sharded training (--fsdp) on 1 and 2 processes at Llama-3.2-1B's shapes, side by side.

    python benchmarks/fsdp.py                       # 1 vs 2 processes, bfloat16 model, Adam
    python benchmarks/fsdp.py --steps 2 --seq-len 128

A random-weight model of Llama-3.2-1B's config (d = 2048, 16 blocks, vocabulary 128,256; saved once in
bfloat16 like a downloaded model) is trained as a user would run it:

    torchrun --nproc_per_node N train_probes.py --fsdp --model FOLDER --model-dtype bfloat16 ...

once with N = 1 (2 threads) and once with N = 2 (1 thread each: the same two cores). For each it
records what every process said it held of the lens and of the optimizer state, its peak RSS, the
memory plan's figure for one process, and the training tokens/s the run wrote into its lens config.
Writes benchmarks/fsdp.csv. Machines are noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELD = re.compile(r"fsdp: process (\d+) of (\d+) held ([\d.]+ [KMG]?i?B) of the lens's ([\d.]+ [KMG]?i?B), .*? and "
                  r"([\d.]+ [KMG]?i?B) of optimizer state")
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def size(text: str) -> float:
    value, unit = text.split()
    return float(value) * UNITS[unit]


def worker(argv: list[str]) -> None:
    """Under torchrun: the training command, then this process's peak RSS."""
    from lenses.commands.train import main

    main(argv)
    with open("/proc/self/status") as f:
        peak = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM"))
    print(f"PEAK {os.environ.get('RANK', '0')} {peak}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", default="1,2")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "fsdp.csv"))
    p.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker is not None:
        return worker(a.worker)
    import pandas as pd
    from transformers import AutoTokenizer

    from lenses.jobs.plan import PlanOptions, components, model_shapes
    from lenses.model.loading import resolve_model_path

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import describe
    from plan_check import model_folder

    folder = model_folder("llama-1b")
    AutoTokenizer.from_pretrained(resolve_model_path(None)).save_pretrained(folder)  # SmolLM2's: ids < 49,152
    corpus = Path(tempfile.mkdtemp()) / "corpus.txt"
    corpus.write_text(("The quick brown fox jumps over the lazy dog and keeps running through the field. " * 40
                       + "\n\n") * 60)
    rows = []
    for n in [int(x) for x in a.processes.split(",")]:
        out = Path(tempfile.mkdtemp()) / f"fsdp{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", "29571",
               __file__, "--worker", "--fsdp", "--model", str(folder), "--model-dtype", "bfloat16", "--corpus",
               str(corpus), "--out", str(out), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size),
               "--steps", str(a.steps), "--optimizer", a.optimizer, "--compute-dtype", "bfloat16",
               "--max-eval-tokens", str(a.seq_len), "--no-progress", "--device", "cpu", "--checkpoint-every", "1000"]
        threads = max(1, (os.cpu_count() or 2) // n)
        t0 = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"})
        if run.returncode:
            raise SystemExit(f"{n} processes failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
        config = json.loads((out / "config.json").read_text())
        peaks = {int(r): int(b) for r, b in re.findall(r"PEAK (\d+) (\d+)", run.stdout)}
        plan = components(model_shapes(folder), PlanOptions(job="train", model_dtype="bfloat16",
                                                            compute_dtype="bfloat16", batch_size=a.batch_size,
                                                            seq_len=a.seq_len, optimizer=a.optimizer, fsdp=True,
                                                            device_type="cpu"), n)
        for rank, world, lens, whole, optim in HELD.findall(run.stdout):
            rows.append({"processes": n, "rank": int(rank), "threads_per_process": threads,
                         "lens_mib": size(lens) / 2**20, "whole_lens_mib": size(whole) / 2**20,
                         "optimizer_mib": size(optim) / 2**20, "peak_rss_mib": peaks.get(int(rank), 0) / 2**20,
                         "plan_lens_mib": plan["lens"] / 2**20, "plan_optimizer_mib": plan["optimizer"] / 2**20,
                         "tokens_per_s": config["training"]["tokens_per_second"],
                         "wall_s": time.perf_counter() - t0})
        print(f"{n} process(es): {rows[-1]['tokens_per_s']:.1f} tokens/s, lens per process "
              f"{rows[-1]['lens_mib']:.1f} of {rows[-1]['whole_lens_mib']:.1f} MiB", flush=True)
    table = pd.DataFrame(rows)
    one = table[table.processes == table.processes.min()]
    table["lens_vs_fewest"] = table.lens_mib / one.lens_mib.iloc[0]
    table["tokens_per_s_vs_fewest"] = table.tokens_per_s / one.tokens_per_s.iloc[0]
    table["machine"] = describe()
    table["date"] = time.strftime("%Y-%m-%d")
    table.to_csv(a.out, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.drop(columns=["machine"]).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
