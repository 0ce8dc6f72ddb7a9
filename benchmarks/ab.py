#!/usr/bin/env python
"""Before/after speed of a change: training and tracing on another commit and on this tree, in one run.

    python benchmarks/ab.py --base 46d0c7c                  # SmolLM2, 3 alternating rounds
    python benchmarks/ab.py --base HEAD~3 --rounds 5 --steps 4

The base commit is checked out into a temporary git worktree. Each side runs the same small harness
(below) in a fresh process against its own library: a training step (model forward + lens KL and
gradient, `lens_kl_backward` of the training module, 4 x 256 tokens, vocabulary matmuls in the dtype `auto`
picks) and a trace (logit + tuned lens, every position of 4 x 256 tokens, `trace`),
both after a warm-up. Those two functions keep their signatures across the redesign, so the
harness runs on both. Rounds alternate (base, this tree, base, ...) so that drifts of a shared
machine hit both sides alike; each side's figure is the median over rounds. Keep the machine
otherwise idle while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HARNESS = r"""
import json, sys, time, torch
from lenses import LogitLens, ModelAdapter, TunedLens, load_model
import os, lenses
# the layout by what this tree holds (not by a failed import: an editable install of the other tree would answer)
if os.path.isdir(os.path.join(os.path.dirname(lenses.__file__), "tracing")):  # the layer folders
    from lenses.text.data import make_blocks, read_texts
    from lenses.tracing.trace import TraceItem, trace
    from lenses.jobs.train import lens_kl_backward
    from lenses.engine import compute_dtype
else:  # before them (one flat package)
    from lenses.data import make_blocks, read_texts
    from lenses.trace import TraceItem, trace
    from lenses.train import lens_kl_backward
    try:
        from lenses.vocab import compute_dtype
    except ImportError:  # before the vocabulary engine
        from lenses.precision import compute_dtype
steps = int(sys.argv[1])
model, tok = load_model()
adapter = ModelAdapter.from_model(model)
blocks, held = make_blocks(read_texts(None), tok, 256)
dtype = compute_dtype("auto", adapter.device)
lens = TunedLens.for_model(adapter)
def step(ids):
    lens_kl_backward(lens, adapter.hidden_states(ids).flatten(1, 2), None, dtype)
    lens.weight.grad = lens.bias.grad = None
step(blocks[:1])
t0 = time.perf_counter()
for s in range(steps):
    step(blocks[4 * s : 4 * s + 4])
train = steps * 4 * 256 / (time.perf_counter() - t0)
lenses = {"logit": LogitLens(adapter), "tuned": TunedLens.for_model(adapter)}
items = [TraceItem(row.tolist(), list(range(256))) for row in held[:4]]
trace(adapter, lenses, items[:1])
t0 = time.perf_counter()
trace(adapter, lenses, items)
print(json.dumps({"train": train, "trace": 4 * 256 / (time.perf_counter() - t0), "dtype": str(dtype)}))
"""


def run_side(tree: Path, steps: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", HARNESS, str(steps)], cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree)}, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare with (required)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per side (default: 3)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps of 1,024 tokens (default: 3)")
    a = p.parse_args()
    found: dict[str, list[dict]] = {"base": [], "this tree": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), a.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for r in range(a.rounds):
                for side, tree in (("base", base), ("this tree", ROOT)):
                    found[side].append(run_side(tree, a.steps))
                    print(f"round {r + 1}, {side}: {found[side][-1]}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    print(f"\nmedian tokens/s over {a.rounds} rounds (base = {a.base}, dtype {found['base'][0]['dtype']}):")
    for what in ("train", "trace"):
        b, t = (statistics.median(r[what] for r in found[s]) for s in ("base", "this tree"))
        print(f"{what:6s} base {b:8.2f}   this tree {t:8.2f}   ratio {t / b:.3f}")


if __name__ == "__main__":
    main()
