#!/usr/bin/env python
"""A traced view on 1 and 2 processes, side by side, on the default model (data parallel under torchrun).

    python benchmarks/views_parallel.py                       # the facts view, 300 facts, both shipped lenses
    python benchmarks/views_parallel.py --view frequency --num-positions 1000

Runs, as a user would, ``analyze.py --view VIEW`` once as one process with 2 threads and once as
``torchrun --nproc_per_node 2`` with 1 thread each (the same two cores), into fresh folders; records the view's
time as the page reports it, the items it traced and items/s, and compares the two runs' tables (top-1 ids
identical; the largest difference of a probability: batches of other texts round differently, as --batch-size
does in one process). Writes benchmarks/views-parallel.csv with the CPU named. Machines are noisy: read the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import describe  # noqa: E402


def run(view: str, out: Path, n: int, extra: list[str]) -> dict:
    args = [str(ROOT / "analyze.py"), "--view", view, "--out", str(out), "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // n), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", "29581",
           *args] if n > 1 else [sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    report = json.loads((out / "report.json").read_text())
    entry = next(v for v in report["views"] if v["name"] == view)
    used = sum(d["used"] for d in entry["data"])
    return {"processes": n, "threads_each": 2 // n, "seconds": round(entry["seconds"], 1), "units": used,
            "unit": entry["data"][0]["unit"]}


def compare(one: Path, two: Path) -> tuple[bool, float]:
    """Whether every table's top-1 ids agree, and the largest difference of a probability column."""
    top1, worst = True, 0.0
    for f in sorted(one.glob("*.csv")):
        a, b = pd.read_csv(f), pd.read_csv(two / f.name)
        if a.shape != b.shape:
            return False, float("inf")
        top1 &= all((a[c] == b[c]).all() for c in a.columns if c.startswith("top") and c.endswith("_id"))
        for c in (c for c in a.columns if c.startswith(("prob", "top1_prob", "mass"))):
            worst = max(worst, float((a[c] - b[c]).abs().max()))
    return top1, worst


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--view", default="facts")
    p.add_argument("--num-facts", default="300")
    a, extra = p.parse_known_args(argv)
    extra = (["--num-facts", a.num_facts] if a.view == "facts" else []) + extra
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(a.view, Path(tmp) / f"p{n}", n, extra) for n in (1, 2)]
        top1, worst = compare(Path(tmp) / "p1", Path(tmp) / "p2")
    for r in rows:
        r.update(view=a.view, per_second=round(r["units"] / r["seconds"], 2), top1_identical=top1,
                 max_prob_difference=worst, machine=describe())
    rows[1]["speedup"] = round(rows[0]["seconds"] / rows[1]["seconds"], 2)
    df = pd.DataFrame(rows)
    df.to_csv(ROOT / "benchmarks" / "views-parallel.csv", index=False)
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
