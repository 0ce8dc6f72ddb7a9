#!/usr/bin/env python
"""The depth views' time under the tracing settings, side by side.

    python benchmarks/views.py                       # the four views of the main command, smaller samples
    python benchmarks/views.py --rounds 2 --settings one-text,batched
    python benchmarks/views.py --before 7434be6^ --settings before,now --isa avx2 --out benchmarks/views-avx2.csv

Settings: `one-text` (one text per forward pass, float32 vocabulary matmuls: the views before batching),
`batched` (the default batch, float32), `default` (the default batch and the default --decode-dtype:
bfloat16 re-scored in float32 where the CPU multiplies bfloat16 natively), `now` (the default, reading
facts and questions as raw text as older code did: the same work as `before`), `before` (the code of
git revision --before, from a temporary worktree, with its own defaults). Each measurement is
`analyze.py --view V` in a fresh process on the default model with the three shipped lenses (the main
command's setting) and a fixed sample (--scale of the main command's); the view's own seconds come from
its report.json (model load excluded). Settings alternate within a round, so a noisy machine slows all
alike: read the ratios. Writes benchmarks/views.csv.

`--isa avx2` runs every process as on a CPU without AVX-512 (PyTorch's kernels, oneDNN and MKL limited
to AVX2: bfloat16 matmuls are then emulated, and `--decode-dtype auto` measures that and picks float32),
with its own lenses cache (the dequantised model linked in), so the choice made here is not reused.
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
SETTINGS = {"one-text": ["--batch-size", "1", "--decode-dtype", "float32"], "batched": ["--decode-dtype", "float32"],
            "default": [], "now": [], "before": []}
RAW = {"facts", "mcq"}  # the views that read a chat template: `now` reads them as raw text
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
SAMPLE = {"frequency": ("--num-positions", 1000), "pos": ("--num-texts", 200), "facts": ("--num-facts", 974),
          "mcq": ("--num-questions", 100)}


def run_view(view: str, setting: str, scale: float, root: Path = ROOT, env: dict | None = None) -> float:
    flag, full = SAMPLE[view]
    out = Path(tempfile.mkdtemp()) / "out"
    cmd = [sys.executable, str(root / "analyze.py"), "--view", view, flag, str(max(2, int(full * scale))),
           "--out", str(out), "--no-progress"] + SETTINGS[setting]
    if setting == "now" and view in RAW:
        cmd += ["--chat-template", "off"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {run.returncode}):\n{run.stdout[-1000:]}\n{run.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return next(v["seconds"] for v in report["views"] if v["name"] == view)


def isa_env(isa: str | None) -> dict | None:
    """The environment of every measured process: as it is, or limited to AVX2 with a cache of its own."""
    if isa is None:
        return None
    cache = Path(tempfile.mkdtemp()) / "lenses-cache"
    cache.mkdir()
    home = Path(os.environ.get("LENSES_CACHE", Path.home() / ".cache" / "lenses"))
    if (home / "gguf").exists():
        (cache / "gguf").symlink_to(home / "gguf")  # the dequantised model, not the dtype choice
    # compiled kernels of their own too: inductor's cache does not key on the ISA, and a kernel compiled
    # under the full ISA, loaded under AVX2, crashed here (segmentation fault)
    return {**os.environ, **AVX2, "LENSES_CACHE": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}


def worktree(rev: str) -> Path:
    """A temporary checkout of ``rev`` (removed by git's prune when its folder is gone)."""
    where = Path(tempfile.mkdtemp()) / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)
    return where


def measure(a, settings: list[str], roots: dict, env: dict | None, rows: list) -> None:
    """Every view under every setting, ``a.rounds`` times, the order of settings alternating by round."""
    for r in range(a.rounds):
        for view in a.views.split(","):
            for setting in settings if r % 2 == 0 else settings[::-1]:
                seconds = run_view(view, setting, a.scale, roots[setting], env)
                rows.append({"round": r, "view": view, "setting": setting, "seconds": seconds})
                print(f"round {r} {view:>9} {setting:>9}: {seconds:7.1f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", default="frequency,pos,facts,mcq")
    p.add_argument("--settings", default="one-text,batched,default", help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--scale", type=float, default=0.3, help="share of the main command's sample (default 0.3)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "views.csv"))
    p.add_argument("--before", help="git revision of the `before` setting (e.g. 7434be6^, the code before batching)")
    p.add_argument("--isa", choices=("avx2",), help="run as on a CPU with only AVX2 (see above)")
    a = p.parse_args()
    import pandas as pd
    from machine import describe

    cpu = describe() + (" limited to AVX2" if a.isa else "")
    print(f"machine: {cpu}; scale {a.scale} of the main command's samples")
    settings = a.settings.split(",")
    if "before" in settings and not a.before:
        raise SystemExit("--settings before needs --before REV (a git revision)")
    roots = {s: worktree(a.before) if s == "before" else ROOT for s in settings}
    env = isa_env(a.isa)
    rows = []
    try:
        measure(a, settings, roots, env, rows)
    finally:
        for root in roots.values():
            if root != ROOT:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(root)], check=False)
    table = pd.DataFrame(rows)
    mean = table.groupby(["view", "setting"], sort=False).seconds.mean().reset_index()
    ref = table[table.setting == settings[0]].groupby("view").seconds.mean()
    mean["speedup_vs_first"] = [ref[v] / s for v, s in zip(mean.view, mean.seconds)]
    mean["machine"] = cpu
    mean["date"] = time.strftime("%Y-%m-%d")
    mean["scale"] = a.scale
    mean["before"] = a.before or ""
    mean.to_csv(a.out, index=False)
    print(mean.to_string(index=False))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
