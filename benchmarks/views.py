#!/usr/bin/env python
"""The depth views' time, one text per forward pass against batched tracing, side by side.

    python benchmarks/views.py                       # the four views of the main command, smaller samples
    python benchmarks/views.py --rounds 2 --batch-sizes 1,8,16

Each measurement is `analyze.py --view V` in a fresh process on the default model with the three
shipped lenses (the main command's setting) and a fixed sample (--scale of the main command's); the
view's own seconds come from its report.json (model load excluded). Batch sizes alternate within a
round, so a noisy machine slows both alike: read the ratios. Writes benchmarks/views.csv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = {"frequency": ("--num-positions", 1000), "pos": ("--num-texts", 200), "facts": ("--num-facts", 974),
          "mcq": ("--num-questions", 100)}


def run_view(view: str, batch: int | None, scale: float) -> float:
    flag, full = SAMPLE[view]
    out = Path(tempfile.mkdtemp()) / "out"
    cmd = [sys.executable, str(ROOT / "analyze.py"), "--view", view, flag, str(max(2, int(full * scale))),
           "--out", str(out), "--no-progress"] + ([] if batch is None else ["--batch-size", str(batch)])
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return next(v["seconds"] for v in report["views"] if v["name"] == view)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", default="frequency,pos,facts,mcq")
    p.add_argument("--batch-sizes", default="1,default", help="comma list; 'default' = the views' own choice")
    p.add_argument("--scale", type=float, default=0.3, help="share of the main command's sample (default 0.3)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "views.csv"))
    a = p.parse_args()
    import pandas as pd

    from machine import describe

    cpu = describe()
    print(f"machine: {cpu}; scale {a.scale} of the main command's samples")
    sizes = [None if b == "default" else int(b) for b in a.batch_sizes.split(",")]
    rows = []
    for r in range(a.rounds):
        for view in a.views.split(","):
            order = sizes if r % 2 == 0 else sizes[::-1]
            for b in order:
                seconds = run_view(view, b, a.scale)
                rows.append({"round": r, "view": view, "batch_size": "default" if b is None else b, "seconds": seconds})
                print(f"round {r} {view:>9} batch {rows[-1]['batch_size']!s:>7}: {seconds:7.1f} s", flush=True)
    table = pd.DataFrame(rows)
    base = table[table.batch_size.astype(str) == str(sizes[0] if sizes[0] is not None else "default")]
    mean = table.groupby(["view", "batch_size"], sort=False).seconds.mean().reset_index()
    ref = base.groupby("view").seconds.mean()
    mean["speedup_vs_first"] = [ref[v] / s for v, s in zip(mean.view, mean.seconds)]
    mean["machine"] = cpu
    mean["date"] = time.strftime("%Y-%m-%d")
    mean["scale"] = a.scale
    mean.to_csv(a.out, index=False)
    print(mean.to_string(index=False))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
