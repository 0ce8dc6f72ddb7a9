#!/usr/bin/env python
"""The depth views' time under the tracing settings, side by side.

    python benchmarks/views.py                       # the four views of the main command, smaller samples
    python benchmarks/views.py --rounds 2 --settings one-text,batched

Settings: `one-text` (one text per forward pass, float32 vocabulary matmuls: the views before batching),
`batched` (the default batch, float32), `default` (the default batch and the default --decode-dtype:
bfloat16 re-scored in float32 where the CPU multiplies bfloat16 natively). Each measurement is
`analyze.py --view V` in a fresh process on the default model with the three shipped lenses (the main
command's setting) and a fixed sample (--scale of the main command's); the view's own seconds come from
its report.json (model load excluded). Settings alternate within a round, so a noisy machine slows all
alike: read the ratios. Writes benchmarks/views.csv.
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
SETTINGS = {"one-text": ["--batch-size", "1", "--decode-dtype", "float32"], "batched": ["--decode-dtype", "float32"],
            "default": []}
SAMPLE = {"frequency": ("--num-positions", 1000), "pos": ("--num-texts", 200), "facts": ("--num-facts", 974),
          "mcq": ("--num-questions", 100)}


def run_view(view: str, setting: str, scale: float) -> float:
    flag, full = SAMPLE[view]
    out = Path(tempfile.mkdtemp()) / "out"
    cmd = [sys.executable, str(ROOT / "analyze.py"), "--view", view, flag, str(max(2, int(full * scale))),
           "--out", str(out), "--no-progress"] + SETTINGS[setting]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return next(v["seconds"] for v in report["views"] if v["name"] == view)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", default="frequency,pos,facts,mcq")
    p.add_argument("--settings", default="one-text,batched,default", help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--scale", type=float, default=0.3, help="share of the main command's sample (default 0.3)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "views.csv"))
    a = p.parse_args()
    import pandas as pd

    from machine import describe

    cpu = describe()
    print(f"machine: {cpu}; scale {a.scale} of the main command's samples")
    settings = a.settings.split(",")
    rows = []
    for r in range(a.rounds):
        for view in a.views.split(","):
            for setting in settings if r % 2 == 0 else settings[::-1]:
                seconds = run_view(view, setting, a.scale)
                rows.append({"round": r, "view": view, "setting": setting, "seconds": seconds})
                print(f"round {r} {view:>9} {setting:>9}: {seconds:7.1f} s", flush=True)
    table = pd.DataFrame(rows)
    mean = table.groupby(["view", "setting"], sort=False).seconds.mean().reset_index()
    ref = table[table.setting == settings[0]].groupby("view").seconds.mean()
    mean["speedup_vs_first"] = [ref[v] / s for v, s in zip(mean.view, mean.seconds)]
    mean["machine"] = cpu
    mean["date"] = time.strftime("%Y-%m-%d")
    mean["scale"] = a.scale
    mean.to_csv(a.out, index=False)
    print(mean.to_string(index=False))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
