#!/usr/bin/env python
"""Before/after speed of a change: `benchmarks/run.py` on another commit and on this tree, in one run.

    python benchmarks/ab.py --base 46d0c7c                 # SmolLM2 training and tracing, 2 rounds
    python benchmarks/ab.py --base HEAD~3 --rounds 3 --tokens 2048

The base commit is checked out into a temporary git worktree. Rounds alternate (base, this tree,
base, this tree, ...) so that slow drifts of a shared machine hit both sides alike; each side's
figure is the median over rounds. Prints tokens/s of our training rows and the trace row, and the
ratio this tree / base. Keep the machine otherwise idle while it runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def run_side(tree: Path, out: Path, tokens: int) -> pd.DataFrame:
    cmd = [sys.executable, str(tree / "benchmarks" / "run.py"), "--models", "smollm2", "--skip",
           "profile,memory,load", "--tokens", str(tokens), "--out", str(out)]
    subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True,
                   stdout=subprocess.DEVNULL)
    table = pd.read_csv(out)
    keep = (table.measure == "trace") | ((table.measure == "train") & table.method.str.startswith("ours"))
    return table[keep][["measure", "method", "tokens_per_s"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare with (default: none, required)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per side (default: 2)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per training step / traced (default: 1024)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), a.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            rows = []
            for r in range(a.rounds):
                for side, tree in (("base", base), ("this tree", ROOT)):
                    found = run_side(tree, Path(tmp) / f"{side}-{r}.csv", a.tokens)
                    rows.append(found.assign(side=side, round=r))
                    print(f"round {r + 1}, {side}: " + ", ".join(f"{m} {v:.1f}" for m, v in
                                                               zip(found.method, found.tokens_per_s)))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    table = pd.concat(rows).pivot_table(index=["measure", "method"], columns="side", values="tokens_per_s",
                                        aggfunc="median")
    table["ratio"] = table["this tree"] / table["base"]
    print(f"\nmedian tokens/s over {a.rounds} rounds (base = {a.base}):")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
