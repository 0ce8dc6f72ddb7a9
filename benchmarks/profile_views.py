#!/usr/bin/env python
"""Where the main command's time goes, per view and part, sampled with py-spy (``pip install -e .[bench]``).

    python benchmarks/profile_views.py                           # this code, 0.3 of the main command's samples
    python benchmarks/profile_views.py --before 7434be6^ --scale 1 --out benchmarks/views-profile.csv

Runs ``analyze.py --view all`` (the default model, the three shipped lenses) under ``py-spy record`` (50
samples a second of the main thread; torch releases the GIL in its kernels, so native time is seen too) for
this code and, with ``--before REV``, for the code of a git revision, one after the other. Each sample is
put in the first part whose rule its stack matches (`PARTS`), under the view it belongs to. Writes a tidy
CSV: code, view, part, seconds, share (of that code's samples).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from views import ROOT, SAMPLE, worktree

RATE = 50  # samples per second
# the first rule that a sample's stack matches names its part (stacks are "frame;frame;..." from py-spy)
PARTS = [
    ("compiling kernels (first use)", r"convert_frame\.py"),
    ("model forward: linear layers", r"(/modeling_|hidden_states \(lenses/models\.py).*torch/nn/modules/linear\.py"),
    ("model forward: the rest", r"/modeling_|hidden_states \(lenses/models\.py"),
    ("vocabulary matmul", r"unembed \(lenses/vocab\.py|\bdecode \(lenses/vocab\.py"),
    ("re-scoring: top-k and exact logits", r"_rescore \(|_exact \(|top_ids \("),
    ("statistics kernels", r"row_stats|rescored_stats|_stats \(lenses/trace\.py|Teacher|mass \(lenses"),
    ("trace tables", r"_rows \(lenses/trace\.py|\btrace \(lenses/trace\.py"),
    ("view tables, summaries, plots", r"lenses/analysis/|lenses/plots\.py"),
]


def part_of(stack: str) -> str:
    return next((name for name, rule in PARTS if re.search(rule, stack)), "load, setup, writing")


def view_of(stack: str) -> str:
    found = re.findall(r"lenses/analysis/(\w+)\.py", stack)
    views = [v for v in found if v not in ("__init__", "common")]
    return views[0] if views else "(outside the views)"


def profile(root: Path, scale: float, raw: Path) -> float:
    """Run the main command of ``root`` under py-spy into ``raw``; its wall seconds."""
    out = Path(tempfile.mkdtemp()) / "out"
    cmd = [sys.executable, str(root / "analyze.py"), "--view", "all", "--out", str(out), "--no-progress"]
    if scale != 1:
        for flag, full in SAMPLE.values():
            cmd += [flag, str(max(2, int(full * scale)))]
    spy = Path(sys.executable).with_name("py-spy")
    t0 = time.perf_counter()
    run = subprocess.run([str(spy), "record", "-r", str(RATE), "-f", "raw", "-o", str(raw), "--", *cmd],
                         capture_output=True, text=True, cwd=root)
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed under py-spy (exit {run.returncode}):\n{run.stderr[-2000:]}")
    return time.perf_counter() - t0


def tally(raw: Path) -> collections.Counter:
    """Samples per (view, part), of the main thread only."""
    counts = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack.startswith("<module> (analyze.py"):
            counts[(view_of(stack), part_of(stack))] += int(n)
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=0.3, help="share of the main command's samples (default 0.3)")
    p.add_argument("--before", help="also profile this git revision's code (e.g. 7434be6^)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "views-profile.csv"))
    a = p.parse_args()
    import pandas as pd
    from machine import describe

    codes = {"now": ROOT}
    if a.before:
        codes = {"before": worktree(a.before), **codes}
    rows = []
    try:
        for code, root in codes.items():
            raw = Path(tempfile.mkdtemp()) / "samples.txt"
            wall = profile(root, a.scale, raw)
            counts = tally(raw)
            total = sum(counts.values())
            print(f"{code}: {wall:.0f} s wall, {total / RATE:.0f} s sampled", flush=True)
            for (view, part), n in sorted(counts.items()):
                rows.append({"code": code, "view": view, "part": part, "seconds": n / RATE, "share": n / total})
    finally:
        for root in codes.values():
            if root != ROOT:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(root)], check=False)
    table = pd.DataFrame(rows)
    table["machine"], table["date"], table["scale"] = describe(), time.strftime("%Y-%m-%d"), a.scale
    table["before"] = a.before or ""
    table.to_csv(a.out, index=False)
    print(table.pivot_table(index=["view", "part"], columns="code", values="seconds", aggfunc="sum").round(1)
          .to_string())
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
